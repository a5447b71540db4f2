"""Where a warm proxy's memory and its start-up time go: by mapping, object kind, package and module.

Usage (as root, from the repository, with the venv bench/run.sh uses):
    python bench/footprint.py [--python PYTHON] [--config CONFIG] [--instructions]

Not a benchmark and no targets: bench/run.py measures the figures; this explains them.
Every part runs the proxy (or its imports) the way bench/run.py does: uid 1501,
PYTHONOPTIMIZE=2, a pod's HOME, pass-through off unless the configuration says otherwise.

- live: a real proxy, warmed as bench/run.py warms it (its token cached, 2 s of wrk at
  c=16, scraped once with --metrics-port), then asked for a report by SIGUSR1 (a
  handler installed by a small bootstrap before the proxy's own code runs): its
  /proc/PID/smaps by kind of mapping; its Python objects by kind and by package (the
  objects reachable from the collector's lists, code objects' constants and tables
  included, each counted once with sys.getsizeof); pymalloc's arenas
  (sys._debugmallocstats); its threads.
- imports: the anonymous memory and RSS each group of modules adds, imported in a fresh
  interpreter in the order a warm proxy has them, the floor server's own modules first
  (so the rest is what the proxy pays beyond any server on this stack).
- start: -X importtime of a real start up to its "starting the proxy server" line,
  grouped: the floor server's modules, the sidecar's own, the rest.
- --instructions (valgrind): callgrind's count of instructions from exec to the first
  /readyz (the proxy) or the first answer (the floor, started the same way), the one
  start-up figure a shared, noisy machine does not blur.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (  # noqa: E402
    AS_PROXY,
    POD_ENV,
    TENANT,
    Bench,
    anonymous_mb,
    free_port,
    proxy_configs,
    rss_mb,
    wait_ready,
)

# Runs the proxy as its console script does, after installing the report handler. The
# handler reads /proc first, before it allocates anything itself.
LIVE_BOOTSTRAP = r'''
import signal, sys

def _report(signum, frame):
    import gc, json, os
    smaps = open("/proc/self/smaps").read()
    status = open("/proc/self/status").read()
    gc.unfreeze()  # get_objects leaves out what gc.freeze moved to the permanent generation
    objects = gc.get_objects()
    seen = {id(objects)}
    kinds, packages = {}, {}
    stack = list(objects)
    stack.extend(sys.modules.values())

    def package_of(name):
        if not name:
            return "?"
        name = str(name)
        if "site-packages/" in name:
            return name.split("site-packages/")[1].split("/")[0].removesuffix(".py")
        if "/python3" in name:
            return "stdlib"
        if name.startswith("<frozen"):
            return "stdlib"
        return name.split(".")[0]

    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = type(obj).__name__
        size = sys.getsizeof(obj)
        count, total = kinds.get(kind, (0, 0))
        kinds[kind] = (count + 1, total + size)
        owner = None
        if kind == "code":
            owner = package_of(obj.co_filename)
            stack.extend((obj.co_consts, obj.co_names, obj.co_linetable, obj.co_exceptiontable,
                          obj.co_filename, obj.co_name, obj.co_qualname))
        elif kind == "function":
            owner = package_of(obj.__code__.co_filename)
        elif isinstance(obj, type):
            module = str(obj.__dict__.get("__module__", "?"))
            owner = package_of(getattr(sys.modules.get(module), "__file__", None) or module)
        elif kind == "module":
            owner = package_of(getattr(obj, "__file__", None))
        if owner is not None:
            packages[owner] = packages.get(owner, 0) + size
        for child in gc.get_referents(obj):
            if id(child) not in seen:
                stack.append(child)
    fd = os.open(os.environ["FOOTPRINT_REPORT"] + ".malloc", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(2)
    os.dup2(fd, 2)
    sys._debugmallocstats()
    os.dup2(saved, 2)
    os.close(fd)
    os.close(saved)
    with open(os.environ["FOOTPRINT_REPORT"], "w") as out:
        json.dump({"smaps": smaps, "status": status, "kinds": kinds, "packages": packages,
                   "modules": sorted(sys.modules)}, out)

signal.signal(signal.SIGUSR1, _report)
from azwi_netproxy.cli import proxy_main
sys.exit(proxy_main())
'''

# Imports groups of modules in a warm proxy's order, the floor server's first; prints the
# module count and anonymous and resident KB after each group (importing nothing itself).
IMPORTS_BOOTSTRAP = r'''
import sys

def sample(label):
    values = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, rest = line.partition(":")
        if key in ("Rss", "Anonymous"):
            values[key] = rest.split()[0]
    print(label, len(sys.modules), values["Anonymous"], values["Rss"], sep="\t", flush=True)

sample("the interpreter and site")
for group in sys.argv[1].split("\x1e"):
    label, code = group.split("\x1f")
    exec(code, {})
    sample(label)
'''

GROUPS = [
    ("asyncio, uvloop, httptools and a listening loop: what the floor server has",
     "import asyncio, uvloop, httptools\n"
     "loop = uvloop.new_event_loop()\n"
     "server = loop.run_until_complete(loop.create_server(asyncio.Protocol, '127.0.0.1', 0))\n"
     "import sys; sys.modules['__main__'].__dict__['_keep'] = (loop, server)"),
    ("the sidecar's modules (and the stdlib they import first: json, dataclasses, urllib.parse, ...)",
     "import azwi_netproxy.cli, azwi_netproxy.proxy.files, azwi_netproxy.proxy.run"),
    ("httpx (with email, http.client, urllib.request, http.cookiejar, idna, ...)", "import httpx"),
    ("httpcore (with h11, anyio's core, certifi)", "import httpcore"),
    ("anyio's asyncio backend (httpcore's first request)", "import anyio._backends._asyncio"),
    ("prometheus_client (--metrics-port)",
     "import prometheus_client, prometheus_client.exposition, prometheus_client.process_collector"),
    ("PyYAML (a YAML identity map)", "import yaml"),
]


def smaps_by_kind(smaps: str) -> dict[str, list[int]]:
    """[rss, anonymous] KB by kind of mapping."""
    kinds: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    name, size_kb = "", 0
    for line in smaps.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            size_kb = (int(head.group(2), 16) - int(head.group(1), 16)) // 1024
            path = head.group(3)
            if path == "[heap]":
                name = "malloc heap ([heap])"
            elif path == "":
                # pymalloc's arenas (1 MiB each, merged by the kernel), malloc's large blocks;
                # thread stacks are 8 MiB mappings, another thread's malloc arena 64 MiB.
                name = "thread stacks" if size_kb == 8192 else "anonymous mappings: pymalloc arenas, large blocks"
            elif path.startswith("["):
                name = path
            else:
                name = "file: " + path.rsplit("/", 1)[-1]
            continue
        key, _, rest = line.partition(":")
        if key == "Rss":
            kinds[name][0] += int(rest.split()[0])
        elif key == "Anonymous":
            kinds[name][1] += int(rest.split()[0])
    return kinds


def live(bench: Bench, args: argparse.Namespace) -> None:
    ca_file, sts_port = bench.token_service()
    bootstrap = bench.tmp / "bootstrap.py"
    bootstrap.write_text(LIVE_BOOTSTRAP)
    os.chmod(bootstrap, 0o644)
    report = bench.tmp / "report"
    os.chmod(bench.tmp, 0o777)  # the proxy (uid 1501) writes its report there
    options = proxy_configs(bench.tmp)[args.config]
    proxy, _, _, _ = bench.warm_proxy(
        ca_file, sts_port, python=args.python, program=(str(bootstrap),),
        metrics=options.get("metrics", False), identity_map=options.get("identity_map"),
        extra_env={**options.get("extra_env", {}), "FOOTPRINT_REPORT": str(report)},
    )
    anon, rss = anonymous_mb(proxy.pid), rss_mb(proxy.pid)
    os.kill(proxy.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not (report.exists() and report.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    data = json.loads(report.read_text())
    malloc = Path(str(report) + ".malloc").read_text()
    bench.stop(proxy)

    print(f"\n## live: a warm proxy ({args.config}; {args.python})\n")
    print(f"anonymous {anon:.2f} MB, RSS {rss:.2f} MB, {len(data['modules'])} modules")
    threads = re.search(r"^Threads:\s+(\d+)", data["status"], re.M)
    print(f"threads: {threads.group(1) if threads else '?'}")
    print("\n| mapping | RSS KB | anonymous KB |\n| --- | --- | --- |")
    for name, (rss_kb, anon_kb) in sorted(smaps_by_kind(data["smaps"]).items(), key=lambda kv: -kv[1][1]):
        if rss_kb >= 64 or anon_kb >= 16:
            print(f"| {name} | {rss_kb:,} | {anon_kb:,} |")
    kinds = data["kinds"]
    total = sum(size for _, size in kinds.values())
    print(f"\nPython objects reachable: {sum(c for c, _ in kinds.values()):,}, {total / 1048576:.2f} MB\n")
    print("| object kind | objects | MB |\n| --- | --- | --- |")
    for kind, (count, size) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"| {kind} | {count:,} | {size / 1048576:.2f} |")
    print("\nCode, functions, classes and modules by package (MB; their dicts and constants apart):\n")
    print("| package | MB |\n| --- | --- |")
    for package, size in sorted(data["packages"].items(), key=lambda kv: -kv[1])[:14]:
        print(f"| {package} | {size / 1048576:.2f} |")
    print("\npymalloc (sys._debugmallocstats, after the walk above allocated its own bookkeeping):\n")
    for line in malloc.splitlines():
        if re.match(r"^(# arenas allocated current|# bytes in allocated blocks|# bytes in available blocks|\d+ unused pools|# bytes lost to)", line):
            print("    " + line)


def token_env(directory: Path) -> dict[str, str]:
    """A pod's environment for a proxy that only starts: a token file (written into
    `directory`) but no token service, pass-through off."""
    token = directory / "token"
    token.write_text("x.y.z")
    token.chmod(0o644)
    return {**POD_ENV, "AZURE_TENANT_ID": TENANT, "AZURE_FEDERATED_TOKEN_FILE": str(token),
            "AZWI_PASSTHROUGH": "none", "METADATA_IP": "127.0.0.1", "METADATA_PORT": "9"}


def imports(args: argparse.Namespace) -> None:
    done = subprocess.run(
        [*AS_PROXY, args.python, "-c", IMPORTS_BOOTSTRAP, "\x1e".join(f"{label}\x1f{code}" for label, code in GROUPS)],
        env=POD_ENV, capture_output=True, text=True, check=True, cwd="/",
    )
    rows = [
        dict(zip(("group", "modules", "Anonymous", "Rss"), line.split("\t"), strict=True))
        for line in done.stdout.splitlines()
    ]
    for row in rows:
        row.update(modules=int(row["modules"]), Anonymous=int(row["Anonymous"]), Rss=int(row["Rss"]))
    print(f"\n## imports: what each group of modules adds ({args.python})\n")
    print("| group | modules | anonymous MB | RSS MB |\n| --- | --- | --- | --- |")
    previous = None
    for row in rows:
        if previous is None:
            print(f"| {row['group']} | {row['modules']} | {row['Anonymous'] / 1024:.2f} | {row['Rss'] / 1024:.2f} |")
        else:
            print(f"| {row['group']} | +{row['modules'] - previous['modules']} | "
                  f"+{(row['Anonymous'] - previous['Anonymous']) / 1024:.2f} | +{(row['Rss'] - previous['Rss']) / 1024:.2f} |")
        previous = row


def start(args: argparse.Namespace) -> None:
    floor_modules = set()
    port = free_port()
    floor = subprocess.Popen(
        [*AS_PROXY, args.python, "-X", "importtime", str(HERE / "floor_server.py"), str(port)],
        env=POD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/",
    )
    wait_ready(port, "/")
    floor.terminate()
    for line in floor.communicate()[1].splitlines():
        if line.startswith("import time:") and "|" in line:
            floor_modules.add(line.split("|")[2].strip())
    work = Path(tempfile.mkdtemp(prefix="azwi-footprint-"))
    work.chmod(0o755)
    env = token_env(work)
    port = free_port()
    proxy = subprocess.Popen(
        [*AS_PROXY, args.python, "-X", "importtime", "-m", "azwi_netproxy", f"--proxy-port={port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/",
    )
    wait_ready(port)
    proxy.terminate()
    groups: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for line in proxy.communicate()[1].splitlines():
        if "starting the proxy server" in line:
            break
        if line.startswith("import time:") and "|" in line:
            self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            if not self_us.isdigit():
                continue
            group = ("the floor server's modules" if name in floor_modules
                     else "the sidecar's own" if name.startswith("azwi_netproxy")
                     else "others (stdlib the sidecar imports first, runpy for -m)")
            groups[group].append((int(self_us), name))
    shutil.rmtree(work)
    print(f"\n## start: modules imported before the listener is up ({args.python}; -X importtime, self times)\n")
    print("| group | modules | ms | the largest |\n| --- | --- | --- | --- |")
    for group, entries in sorted(groups.items(), key=lambda kv: -sum(us for us, _ in kv[1])):
        largest = ", ".join(f"{name} {us / 1000:.1f}" for us, name in sorted(entries, reverse=True)[:6])
        print(f"| {group} | {len(entries)} | {sum(us for us, _ in entries) / 1000:.1f} | {largest} |")


# Exits at the first /readyz the app is asked (the proxy) or the first answer (the floor),
# so that callgrind counts exactly exec → ready. warm_up (50 ms after the listener) is
# switched off: under valgrind 50 ms go by long before the first request is read.
CALLGRIND_BOOTSTRAP = r'''
import os, sys
if sys.argv[1] == "floor":
    sys.path.insert(0, sys.argv[2])
    import floor_server
    floor_server.Floor.on_message_complete = lambda self: os._exit(0)
    sys.argv = [sys.argv[0], sys.argv[3]]
    floor_server.serve(floor_server.Floor)
else:
    del sys.argv[1]
    from importlib.machinery import PathFinder

    def patch(run):
        for name in ("_warm_exchanges", "warm_exchanges"):
            if hasattr(run, name):
                setattr(run, name, lambda *a, **k: None)
        if hasattr(run, "warm_up"):
            async def no_warm_up(*a, **k):
                return False

            run.warm_up = no_warm_up
        app = sys.modules["azwi_netproxy.proxy.app"]
        dispatch = app.TokenApp.dispatch

        def first_readyz(self, request):
            answer = dispatch(self, request)
            if request.target.startswith(b"/readyz"):
                os._exit(0)
            return answer

        app.TokenApp.dispatch = first_readyz

    class Hook:
        @staticmethod
        def find_spec(name, path, target=None):
            if name != "azwi_netproxy.proxy.run":
                return None
            spec = PathFinder.find_spec(name, path)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook)
    from azwi_netproxy.cli import proxy_main
    sys.exit(proxy_main())
'''


def instructions(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None:
        print("\n(instructions: valgrind is not installed)")
        return
    work = Path(tempfile.mkdtemp(prefix="azwi-callgrind-"))
    work.chmod(0o777)
    bootstrap = work / "bootstrap.py"
    bootstrap.write_text(CALLGRIND_BOOTSTRAP)
    bootstrap.chmod(0o644)
    env = token_env(work)
    print("\n## instructions from exec to the first /readyz (callgrind)\n")
    print("| program | python | instructions |\n| --- | --- | --- |")
    pythons = [args.python, *([args.baseline] if args.baseline else [])]
    runs = [("floor", args.python)] + [("proxy", python) for python in pythons]
    for what, python in runs:
        port = free_port()
        out = work / f"{what}-{len(list(work.iterdir()))}.out"
        program = [python, str(bootstrap), what]
        program += [str(HERE), str(port)] if what == "floor" else [f"--proxy-port={port}"]
        # Not as uid 1501: the count does not depend on it, and valgrind's output needs a
        # place that uid may write to.
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *program],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        import http.client

        while proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("GET", "/readyz")
                conn.getresponse()
            except OSError:
                time.sleep(0.005)
        total = next(int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("summary:"))
        print(f"| {'the floor server' if what == 'floor' else 'the proxy'} | {python} | {total / 1e6:.1f} M |")
    shutil.rmtree(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the venv's python whose proxy is examined")
    parser.add_argument("--baseline", default=None, help="another build's python (for --instructions)")
    parser.add_argument("--config", default="pass-through off",
                        choices=["pass-through off", "pass-through on", "--metrics-port", "YAML identity map"])
    parser.add_argument("--parts", default="live,imports,start", help="any of live, imports, start")
    parser.add_argument("--instructions", action="store_true", help="also count start-up instructions (valgrind)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    bench = Bench(argparse.Namespace(duration=2, rounds=1, processes=1, quick=True, starts=1,
                                     readyz_baseline_python=None))
    try:
        if "live" in parts:
            live(bench, args)
        if "imports" in parts:
            imports(args)
        if "start" in parts:
            start(args)
        if args.instructions:
            instructions(args)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
