"""Image build step: the bytecode of the standard library modules a program imports.

Usage: python compile_stdlib.py LEVEL MODULE...

Imports each MODULE (NAME.* for a package and all its submodules), then compiles, at
LEVEL (0, or 2 for a program run with PYTHONOPTIMIZE=2), the standard library file of
every module that is loaded by then. Exit 1 if any of them does not compile. The
Dockerfile runs it in each image with that image's programs: the official python images
ship no .pyc, and a program would otherwise compile these modules at every start.
"""

from __future__ import annotations

import compileall
import importlib
import pkgutil
import sys
import sysconfig


def main(argv: list[str]) -> int:
    level, *names = argv
    for name in names:
        package = name.removesuffix(".*")
        module = importlib.import_module(package)
        if name.endswith(".*"):
            for sub in pkgutil.walk_packages(module.__path__, package + "."):
                importlib.import_module(sub.name)
    stdlib = sysconfig.get_path("stdlib") + "/"
    loaded = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
    files = sorted(f for f in loaded if f.startswith(stdlib))
    compiled = [compileall.compile_file(f, quiet=1, optimize=int(level)) for f in files]
    return 0 if all(compiled) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
