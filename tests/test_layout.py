"""The tree by program: which package may import which, and what each program loads.

Name: test_layout
Scope: the package's source read with `ast` (every import statement, lazy ones included),
    and fresh interpreters that import a program's modules and list what got loaded.
Depends: nothing of the package at import time (its files are parsed, not imported).

What is asserted (issue 18, and `azwi_netproxy/__init__.py`): a program never imports
another program's package; the shared modules at the top import no program; the sidecar
never loads pyroute2, the demo, migrate or the init; the init never loads the sidecar or
its HTTP stack; the CNI plugin and its agent load the init's rules and nothing of the
sidecar.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import azwi_netproxy

PACKAGE = Path(azwi_netproxy.__file__).resolve().parent
PROGRAMS = ("proxy", "init", "cni", "migrate", "demo")
# enrolment and nodecontrol: node mode's record and run dir, which the CNI plugin writes and
# the node process (the sidecar's package) reads.
SHARED = ("errors", "logs", "settings", "identitymap", "enrolment", "nodecontrol")
# One rule model, two front ends: the CNI plugin installs the init's rules (issue 19).
MAY_ALSO_IMPORT = {"cni": {"init"}}


def _imports(path: Path) -> set[str]:
    """Every azwi_netproxy module `path` names in an import, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("azwi_netproxy"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("azwi_netproxy"))
    return names


def _program_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PROGRAMS else None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_a_program_never_imports_another_programs_package(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    own = relative.parts[0] if len(relative.parts) > 1 else None
    imported_programs = {_program_of(name) for name in _imports(path)} - {None}
    if own is None and relative.stem in SHARED:
        assert imported_programs == set(), f"{relative}: shared code imports {imported_programs}"
    elif own is not None:
        allowed = {own} | MAY_ALSO_IMPORT.get(own, set())
        assert imported_programs <= allowed, f"{relative} ({own}) imports {imported_programs - allowed}"


def _loaded_after(*modules: str) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return set(done.stdout.split())


def test_the_sidecar_loads_no_pyroute2_demo_migrate_or_init() -> None:
    # What the sidecar can ever import: its assembly, the exchange (both endpoints), files.
    loaded = _loaded_after("azwi_netproxy.cli", "azwi_netproxy.proxy.run", "azwi_netproxy.proxy.binding",
                           "azwi_netproxy.proxy.files", "azwi_netproxy.proxy.probe")
    assert "azwi_netproxy.proxy.app" in loaded  # the import really happened
    forbidden = {m for m in loaded if m.split(".")[0] in ("pyroute2", "iptc")}
    forbidden |= {m for m in loaded if _program_of(m) not in (None, "proxy")}
    assert forbidden == set()


def test_the_sidecar_loads_nothing_of_node_mode() -> None:
    """A sidecar in every pod pays for what it imports: node mode's modules stay out."""
    loaded = _loaded_after("azwi_netproxy.cli", "azwi_netproxy.proxy.run")
    node_mode = {"azwi_netproxy.proxy.node", "azwi_netproxy.proxy.pods", "azwi_netproxy.proxy.control",
                 "azwi_netproxy.proxy.netns", "azwi_netproxy.proxy.podtoken", "azwi_netproxy.nodecontrol",
                 "azwi_netproxy.enrolment"}
    assert loaded & node_mode == set()


def test_the_init_loads_neither_the_sidecar_nor_its_http_stack() -> None:
    loaded = _loaded_after("azwi_netproxy.cli", "azwi_netproxy.init.run")
    assert "azwi_netproxy.init.rules" in loaded
    assert {m for m in loaded if _program_of(m) not in (None, "init")} == set()
    assert {m for m in loaded if m.split(".")[0] in ("httpx", "httpcore", "uvloop", "httptools", "pyroute2")} == set()


def test_the_cni_plugin_loads_the_init_but_not_the_sidecar() -> None:
    loaded = _loaded_after("azwi_netproxy.cli", "azwi_netproxy.cni.plugin", "azwi_netproxy.cni.agent",
                           "azwi_netproxy.init.run")
    assert {"azwi_netproxy.cni.spec", "azwi_netproxy.init.rules"} <= loaded
    assert {m for m in loaded if _program_of(m) not in (None, "init", "cni")} == set()
    assert {m for m in loaded if m.split(".")[0] in ("httpx", "httpcore", "uvloop", "httptools", "pyroute2")} == set()
