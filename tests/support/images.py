"""The images as users build them (podman), and pods of containers in test namespaces.

Name: support.images
Scope: `ImageSet` is built once per session by tests/test_images.py's fixture; `PodNet` and
    `Pod` live for one test and remove what they made (containers, namespaces, processes).
Depends: root, podman (Debian's package; runc), mmdebstrap for the base image, the package
    index and a Debian mirror (through the host's CA bundle, mounted into builds, never
    copied into an image), support.netns, support.fake_entra, support.fake_imds.

Storage: the tests keep their own containers storage (`podman --root`) in STORAGE, so
they never see or touch other images on the machine. Kept there between runs, on purpose:
- the base image BASE_IMAGE (mmdebstrap, about 100 s to make), reused while it exists;
- the build cache of the last session's builds (the untagged layers those builds used or
  made), so an unchanged tree rebuilds in seconds. Older untagged images are removed at
  the end of every session, and so are the session's own tags.
`rm -rf /var/lib/azwi-netproxy-test` (with no test running) starts from nothing;
AZWI_TEST_PYTHON_IMAGE names another base (e.g. python:3.11-slim-bookworm where a registry
is reachable), used as it is.

Network: builds run with `--network host` (no bridge, no NAT or forwarding set up by
podman) because they download packages; every container the tests run is in a namespace
the test made (`--network ns:/run/netns/NAME`) or has no network at all (`--network none`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trustme

from support import netns
from support.fake_entra import FakeEntraClient, issue_server_cert
from support.fake_imds import FakeImdsClient
from support.proxyproc import ScriptProcess, shared_tempdir, stop_process

REPO: Final = Path(__file__).resolve().parents[2]
STORAGE: Final = Path("/var/lib/azwi-netproxy-test/containers")
RUNROOT: Final = Path("/run/azwi-netproxy-test/containers")
# Without any .pyc, as the official python images are (they delete every one): what an
# image needs compiled it must compile itself, and tests/test_images.py sees what is missing.
BASE_IMAGE: Final = "localhost/azwi-netproxy-test-base:bookworm-nopyc"
# The base of earlier runs, with Debian's .pyc files: removed when the new one is made.
_OLD_BASE_IMAGES: Final = ("localhost/azwi-netproxy-test-base:bookworm",)
TAG_PREFIX: Final = "localhost/azwi-netproxy-test:"  # + session + "-" + what
PYTHON_IMAGE_OVERRIDE: Final = os.environ.get("AZWI_TEST_PYTHON_IMAGE", "").strip()
MMDEBSTRAP_ARGS: Final = (
    "--variant=minbase",
    "--include=python3,python3-venv,python-is-python3,ca-certificates",
    '--customize-hook=find "$1/usr/lib/python3" "$1/usr/lib/python3.11" -depth -name __pycache__ -type d '
    "-exec rm -rf {} +",
    "bookworm",
    "-",
)
HOST_CA_BUNDLE: Final = Path("/etc/ssl/certs/ca-certificates.crt")
# runc here cannot apply podman's default nproc limit; these are what a kubelet's pods get.
ULIMITS: Final = ("--ulimit", "nproc=4096:4096", "--ulimit", "nofile=1024:1024")

# The app containers: curl and azure-identity in a venv, on the same base.
APP_CONTAINERFILE: Final = """\
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/app && PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/app/bin/pip install \
    --no-cache-dir --disable-pip-version-check "azure-identity>=1.15"
"""


# ---- podman ---------------------------------------------------------------------------------


class Podman:
    """podman on the tests' own storage; every call has a timeout and is logged."""

    def __init__(self, log: Transcript | None = None) -> None:
        self.log = log

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(STORAGE), "--runroot", str(RUNROOT), *args]

    def run(
        self, *args: str, timeout: float = 60, input: str | bytes | None = None, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        done = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=isinstance(input, str | None),
            input=input,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if not isinstance(done.stdout, str):
            done = subprocess.CompletedProcess(
                done.args,
                done.returncode,
                done.stdout.decode(errors="replace"),
                done.stderr.decode(errors="replace"),
            )
        if self.log is not None and not quiet:
            self.log.command(["podman", *args], done, time.monotonic() - started)
        return done

    def ok(self, *args: str, timeout: float = 60, quiet: bool = False) -> str:
        done = self.run(*args, timeout=timeout, quiet=quiet)
        if done.returncode != 0:
            raise AssertionError(
                f"podman {shlex.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, quiet=True).returncode == 0

    def inspect(self, image: str) -> dict[str, Any]:
        doc = json.loads(self.ok("image", "inspect", image, quiet=True))
        assert isinstance(doc, list) and len(doc) == 1
        return dict(doc[0])


def unusable_reason() -> str | None:
    """Why podman cannot run images here, or None."""
    if os.geteuid() != 0:
        return "needs root (podman with its own storage and network namespaces)"
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/bootstrap.sh installs it: apt-get install podman)"
    if not PYTHON_IMAGE_OVERRIDE and shutil.which("mmdebstrap") is None and not _base_cached():
        return "mmdebstrap is not installed, so no base image can be made (apt-get install mmdebstrap)"
    try:
        done = subprocess.run(
            Podman().argv("info", "--format", "{{.Host.OCIRuntime.Name}}"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer within 60 s"
    if done.returncode != 0:
        return f"`podman info` failed: {done.stderr.strip()[-300:]}"
    return None


def _base_cached() -> bool:
    with suppress(OSError, subprocess.TimeoutExpired):
        return (
            subprocess.run(
                Podman().argv("image", "exists", BASE_IMAGE), capture_output=True, timeout=60, check=False
            ).returncode
            == 0
        )
    return False


# ---- what a test did, for the reader ---------------------------------------------------------


class Transcript:
    """The commands a test ran and what they printed, as one readable log (printed at the end)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(f"[{time.monotonic() - self.started:6.2f}s] {text}")

    def command(self, argv: Sequence[str], done: subprocess.CompletedProcess[str], took: float) -> None:
        shown = [a for a in argv if a not in ULIMITS and not a.startswith(("nproc=", "nofile="))]
        self.note(f"$ {_shorten(shlex.join(shown))}  -> exit {done.returncode} ({took:.2f} s)")
        out = (done.stdout + done.stderr).strip()
        for line in out.splitlines()[-6:]:
            self.lines.append(f"           | {line[:300]}")

    def text(self) -> str:
        return "\n".join(self.lines)


def _shorten(command: str) -> str:
    """Long values (scripts, tokens, GUIDs) cut so each command fits on a line or two."""
    command = command.replace("\n", "\\n")
    command = re.sub(r"'[^']{120,}'", lambda m: m.group(0)[:60] + "...'", command)
    return command if len(command) < 600 else command[:600] + " ..."


# ---- the images ---------------------------------------------------------------------------


@dataclass
class ImageSet:
    """The session's images (unique tags) and the build's own log."""

    base: str
    proxy: str
    init: str
    app: str
    build_seconds: float

    def size(self, podman: Podman, image: str) -> int:
        return int(podman.inspect(image)["Size"])


def _build(
    podman: Podman,
    tag: str,
    base: str,
    *,
    target: str | None,
    context: Path,
    containerfile: Path,
    used: set[str],
    timeout: float = 1200,
) -> None:
    args = [
        "build",
        "--network",
        "host",
        "--layers",
        "--pull=never",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-f",
        str(containerfile),
        "-t",
        tag,
    ]
    if target is not None:
        args += ["--target", target]
    if HOST_CA_BUNDLE.is_file():
        # The corporate-proxy case (README.md): trusted during the build, in no layer.
        args += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    done = podman.run(*args, str(context), timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"building {tag} failed ({done.returncode}):\n{done.stdout[-6000:]}{done.stderr[-3000:]}"
        )
    used.update(re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})\s*$", done.stdout, re.MULTILINE))


def ensure_base(podman: Podman) -> str:
    """The base image: AZWI_TEST_PYTHON_IMAGE, or BASE_IMAGE, made with mmdebstrap if missing."""
    if PYTHON_IMAGE_OVERRIDE:
        if not podman.exists(PYTHON_IMAGE_OVERRIDE):
            podman.ok("pull", PYTHON_IMAGE_OVERRIDE, timeout=600)
        return PYTHON_IMAGE_OVERRIDE
    if podman.exists(BASE_IMAGE):
        return BASE_IMAGE
    for old in _OLD_BASE_IMAGES:
        if podman.exists(old):
            podman.run("rmi", "-f", old, quiet=True)
    # Debian's mirrors are plain http (signed by the archive key): no CA needed here.
    strap = subprocess.Popen(["mmdebstrap", *MMDEBSTRAP_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        imported = subprocess.run(
            podman.argv("import", "-", BASE_IMAGE),
            stdin=strap.stdout,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert strap.stdout is not None
        strap.stdout.close()
        _, err = strap.communicate(timeout=60)
    finally:
        if strap.poll() is None:
            strap.kill()
            strap.wait(10)
    if strap.returncode != 0 or imported.returncode != 0:
        with suppress(subprocess.TimeoutExpired):
            podman.run("rmi", "-f", BASE_IMAGE, quiet=True)
        raise AssertionError(
            f"mmdebstrap | podman import failed ({strap.returncode}, {imported.returncode}):\n"
            f"{err.decode(errors='replace')[-3000:]}{imported.stderr[-2000:]}"
        )
    return BASE_IMAGE


@contextmanager
def storage_lock() -> Iterator[None]:
    """One test session at a time on the tests' storage (the cleanup removes untagged images)."""
    STORAGE.mkdir(parents=True, exist_ok=True)
    with (STORAGE / ".session.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_images(podman: Podman, session: str, scratch: Path, used: set[str]) -> ImageSet:
    """Both targets of the Dockerfile and the app image, tagged for this session; the layers
    the builds used or made are added to `used`."""
    started = time.monotonic()
    base = ensure_base(podman)
    prefix = f"{TAG_PREFIX}{session}"
    images = ImageSet(
        base=base,
        proxy=f"{prefix}-proxy",
        init=f"{prefix}-proxy-init",
        app=f"{prefix}-app",
        build_seconds=0.0,
    )
    dockerfile = REPO / "Dockerfile"
    _build(podman, images.proxy, base, target="proxy", context=REPO, containerfile=dockerfile, used=used)
    _build(podman, images.init, base, target="proxy-init", context=REPO, containerfile=dockerfile, used=used)
    app_dir = scratch / "app-image"
    app_dir.mkdir()
    (app_dir / "Containerfile").write_text(APP_CONTAINERFILE)
    _build(
        podman,
        images.app,
        base,
        target=None,
        context=app_dir,
        containerfile=app_dir / "Containerfile",
        used=used,
    )
    images.build_seconds = time.monotonic() - started
    return images


def remove_images(podman: Podman, used: set[str]) -> None:
    """The tests' tags, then every untagged image its builds did not use (stale cache).

    `podman untag` leaves the images themselves, so what this session built or reused stays
    as the next session's cache; `used` holds the layers its builds reported, also when a
    build failed part-way.
    """
    listed = podman.run("images", "--format", "{{.Repository}}:{{.Tag}}", quiet=True).stdout.split()
    for tag in listed:
        # Under the session lock every test tag is this session's or one a killed run left.
        if tag.startswith(TAG_PREFIX):
            podman.run("untag", tag, tag, quiet=True)
    for _ in range(10):  # children first: a parent goes once nothing is built on it
        doc = json.loads(podman.run("images", "-a", "--format", "json", quiet=True).stdout or "[]")
        stale = [i["Id"] for i in doc if not i.get("Names") and not any(i["Id"].startswith(k) for k in used)]
        if sum(podman.run("rmi", i, quiet=True).returncode == 0 for i in stale) == 0:
            break


# ---- the pod's network ------------------------------------------------------------------------

# The pod's eth0 and default route lead to NODE, which holds the node's IMDS and, behind it,
# the token services: the only way out of the pod, as on a node. Both are test namespaces.
POD_ADDR: Final = "198.18.4.2"
NODE_ADDR: Final = "198.18.4.1"
ENTRA_ADDR: Final = "198.18.5.1"
ENTRA_PORT: Final = 443
BINDING_PORT: Final = 8443
BINDING_SNI: Final = "tokenproxy.azure-workload-identity.svc"


@dataclass
class PodNet:
    pod: str
    node: str
    work: Path
    ca_file: Path
    entra: ScriptProcess
    binding: ScriptProcess
    imds: ScriptProcess

    def entra_client(self) -> FakeEntraClient:
        return FakeEntraClient(f"https://{ENTRA_ADDR}:{ENTRA_PORT}", str(self.ca_file))

    def binding_client(self) -> FakeEntraClient:
        return FakeEntraClient(
            f"https://{ENTRA_ADDR}:{BINDING_PORT}", str(self.ca_file), sni_name=BINDING_SNI
        )

    def imds_client(self) -> FakeImdsClient:
        return FakeImdsClient(f"http://{netns.METADATA_IP}:80")



@contextmanager
def pod_network() -> Iterator[PodNet]:
    """POD (lo, eth0 with an address and a default route) and NODE with the fakes."""
    with ExitStack() as stack:
        pod = stack.enter_context(netns.namespace("azimgpod"))
        node = stack.enter_context(netns.namespace("azimgnode"))
        netns.connect(node, pod, near_addr=NODE_ADDR, far_addr=POD_ADDR)
        done = netns.run_in(pod, ["ip", "route", "add", "default", "via", NODE_ADDR])
        assert done.returncode == 0, done.stderr
        for address in (netns.METADATA_IP, ENTRA_ADDR):
            netns.add_address(node, "lo", address)
        work = shared_tempdir("azwi-img-pod-")
        stack.callback(shutil.rmtree, work, True)
        ca = trustme.CA()
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca_file.chmod(0o644)
        entra_certs, binding_certs = work / "entra-cert", work / "binding-cert"
        issue_server_cert(ca, entra_certs, ENTRA_ADDR)
        issue_server_cert(ca, binding_certs, BINDING_SNI)
        procs = []
        for args in (
            ("fake_entra.py", f"{ENTRA_ADDR}:{ENTRA_PORT}", "entra.log", "--cert-dir", str(entra_certs)),
            (
                "fake_entra.py",
                f"{ENTRA_ADDR}:{BINDING_PORT}",
                "binding.log",
                "--cert-dir",
                str(binding_certs),
                "--sni-only",
                BINDING_SNI,
            ),
            ("fake_imds.py", f"{netns.METADATA_IP}:80", "imds.log"),
        ):
            script, bind, log, *extra = args
            started = netns.start_fake_in(node, script, bind, work / log, *extra)
            stack.callback(stop_process, started.proc)
            procs.append(started)
        yield PodNet(pod, node, work, ca_file, *procs)


# ---- containers --------------------------------------------------------------------------------


class Containers:
    """Containers of one test, in its pod namespace; all removed (by name) at the end."""

    def __init__(self, podman: Podman, net: PodNet) -> None:
        self.podman = podman
        self.net = net
        self.names: list[str] = []

    def name(self, role: str) -> str:
        name = f"azimg-{role}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def network(self) -> list[str]:
        return ["--network", f"ns:/run/netns/{self.net.pod}"]

    def run(
        self, role: str, image: str, *args: str, flags: Sequence[str] = (), timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A container run to completion (an init container, a client)."""
        name = self.name(role)
        return self.podman.run(
            "run", "--name", name, *self.network(), *ULIMITS, *flags, image, *args, timeout=timeout
        )

    def start(self, role: str, image: str, *args: str, flags: Sequence[str] = ()) -> str:
        """A long-running container, detached; its name."""
        name = self.name(role)
        self.podman.ok("run", "-d", "--name", name, *self.network(), *ULIMITS, *flags, image, *args)
        return name

    def close(self) -> None:
        for name in reversed(self.names):
            with suppress(subprocess.TimeoutExpired):
                self.podman.run("rm", "-f", "-t", "0", name, quiet=True)
