"""One node in node mode: pods in their own namespaces, the node process, the CNI plugin run
through the agent's shim as a runtime runs it, the kubelet's pod directories, a fake Entra.

Name: support.nodemode
Scope: `node_mode()` builds it all in one `with` block and removes everything it made
    (namespaces, processes by PID, temp dirs) when the block ends, even when it raises.
Depends: root + netns + nft, support.cni_node (the real agent, its shim, `Runtime`),
    support.netns, support.fake_entra, trustme, the package's `azwi-netproxy-node` in this venv.

Topology (nothing linked to the root namespace, no forwarding, 198.18.0.0/15 addresses):

    POD i (i = 0, 1, ...)  198.19.i.1/30 ---- 198.19.i.2   IMDS   169.254.169.254 (tripwires)
                           default route via IMDS, as a pod has one
    NODE                   198.18.0.1/30 ---- 198.18.0.2   IMDS   (the node's own IMDS: only
                                                                    pass-through may go there)
    NODE                   198.18.1.1/30 ---- 198.18.1.2   STS    (the fake Entra, HTTPS)

The node process runs in NODE as root (its own namespace, like a DaemonSet's hostNetwork),
reading pods' tokens from a kubelet-style pods dir: `<pods>/<uid>/volumes/kubernetes.io~projected/
<volume-with-hash>/token/azure-identity-token`, rotated as the kubelet's AtomicWriter does.
Every judgement of where traffic went belongs to the kernel (tripwire listeners in IMDS),
to the fake Entra's records, and to curl, never to the product's code.

The pieces also build nodes of other shapes (test_node_containerd: containerd's CRI makes
the pods): `KubeletPod` (a pod's namespace, identity and kubelet dir), `start_sts` (the fake
Entra of one tenant), `node_env` and `NodeProcess` (the node process, optionally in another
process's mount namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trustme

from support import netns
from support.cni_node import REFERENCE_PLUGINS, Node, Outcome, Runtime, cluster_conflist, node
from support.fake_entra import FakeEntraClient, decode_fake_token, issue_server_cert
from support.pod import Curl, curl_in, in_netns
from support.proxyproc import (
    ProjectedToken,
    ScriptProcess,
    make_sa_token,
    new_guid,
    shared_tempdir,
    stop_process,
)

NODE_BINARY: Final = Path(sys.executable).with_name("azwi-netproxy-node")
METADATA_IP: Final = netns.METADATA_IP
NODE_IMDS_ADDR: Final = "198.18.0.2"
STS_ADDR: Final = "198.18.1.2"
TOKEN_URL: Final = (
    f"http://{METADATA_IP}/metadata/identity/oauth2/token"
    "?api-version=2018-02-01&resource=https://management.azure.com/"
)
INSTANCE_URL: Final = f"http://{METADATA_IP}/metadata/instance?api-version=2021-02-01"
# Where the webhook's projected token lies in a pod's dir, by webhook version.
LAYOUT_V16: Final = "token/azure-identity-token"
LAYOUT_OLD: Final = "azure-identity-token"


# ---- the pieces (test_node_containerd and test_images build their own nodes on them) ----------


@dataclass(kw_only=True)
class KubeletPod:
    """One pod as node mode sees it: its network namespace (an `ip netns` name), its identity
    and its kubelet dir, where `project_token` puts the webhook's projected token."""

    ns: str
    uid: str
    namespace: str
    name: str
    service_account: str
    issuer: str
    kubelet_dir: Path
    token: ProjectedToken | None = None

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def subject(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def new_sa_token(self) -> str:
        return make_sa_token(self.namespace, self.service_account, issuer=self.issuer)

    def project_token(self, layout: str = LAYOUT_V16) -> ProjectedToken:
        """Project the service account token as the kubelet does (the volume's name hashed)."""
        volume = self.kubelet_dir / "volumes" / "kubernetes.io~projected" / f"azure-identity-token-{uuid.uuid4().hex[:5]}"
        volume.mkdir(parents=True, mode=0o755)
        self.token = ProjectedToken(volume, self.new_sa_token(), relpath=layout)
        return self.token

    def curl(self, url: str = TOKEN_URL, *headers: str, uid: int | None = 1000, max_time_s: float = 10.0) -> Curl:
        return curl_in(self.ns, url, *headers, uid=uid, max_time_s=max_time_s)


def seconds_until_served(pod: KubeletPod, started: float, limit_s: float = 10.0) -> float | None:
    """Seconds from `started` (time.monotonic) until the pod's token request is answered 200,
    or None if it is not within `limit_s`."""
    while time.monotonic() - started < limit_s:
        if pod.curl(max_time_s=2).status == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def token_claims(got: Curl) -> dict[str, Any]:
    """The claims of the access token in a 200 answer (the fake Entra's, so they say whom
    Entra minted it for)."""
    return decode_fake_token(json.loads(got.body)["access_token"])


def kubelet_dir(pods_dir: Path, uid: str) -> Path:
    """The kubelet's directory of pod `uid` (made here, before the sandbox, as the kubelet does)."""
    directory = pods_dir / uid
    directory.mkdir(mode=0o750)
    return directory


@dataclass
class FakeSts:
    """The fake Entra over HTTPS on `addr`:443 in namespace `ns`, for one tenant."""

    ns: str
    addr: str
    ca_file: str
    tenant_id: str
    process: ScriptProcess

    @property
    def authority(self) -> str:
        return f"https://{self.addr}/"

    def client(self) -> FakeEntraClient:
        return FakeEntraClient(f"https://{self.addr}:443", self.ca_file)

    def add_app(self, client_id: str, *pods: KubeletPod) -> None:
        """An app in the tenant whose federated credentials trust exactly these pods' accounts."""
        issuers = {pod.issuer for pod in pods}
        assert len(issuers) == 1
        in_netns(self.ns, lambda: self.client().add_app(
            self.tenant_id, client_id, [pod.subject for pod in pods], issuers.pop()))

    def exchanges(self) -> list[dict[str, Any]]:
        return in_netns(self.ns, self.client().exchanges)


def start_sts(stack: contextlib.ExitStack, base: Path, ns: str, addr: str) -> FakeSts:
    """A fake Entra in `ns` with a certificate for `addr` from a throwaway CA (ca.pem in
    `base`, readable by all); stopped by `stack`."""
    ca = trustme.CA()
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)
    cert_dir = base / "entra-cert"
    issue_server_cert(ca, cert_dir, addr)
    entra = netns.start_fake_in(ns, "fake_entra.py", f"{addr}:443", base / "fake_entra.log",
                                "--cert-dir", str(cert_dir))
    stack.callback(stop_process, entra.proc)
    return FakeSts(ns=ns, addr=addr, ca_file=str(ca_file), tenant_id=new_guid(), process=entra)


def node_env(sts: FakeSts, *, pods_dir: Path, run_dir: Path, python_env: Mapping[str, str] | None = None,
             **extra: str) -> dict[str, str]:
    """The node process's environment, as the DaemonSet gives it (the authority: the fake)."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        **(python_env or {}),
        "AZURE_TENANT_ID": sts.tenant_id,
        "AZURE_AUTHORITY_HOST": sts.authority,
        "SSL_CERT_FILE": sts.ca_file,
        "AZWI_KUBELET_PODS_DIR": str(pods_dir),
        "AZWI_CNI_RUN_DIR": str(run_dir),
        "LOG_LEVEL": "debug",
        "NO_PROXY": "*",
        **extra,
    }


@dataclass
class NodeProcess:
    """`azwi-netproxy-node` as root in network namespace `ns` (the node's), its logs in `base`.

    With `mount_ns_pid`, it runs in that process's mount namespace too: where a runtime that
    keeps its pods' namespace paths in a mount namespace of its own (support.cri's
    containerd) has them, as a DaemonSet sees the host's /var/run/netns through a mount.
    """

    base: Path
    ns: str
    env: dict[str, str]
    mount_ns_pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    _logs: int = 0

    def argv(self, *args: str) -> list[str]:
        if self.mount_ns_pid is None:
            return netns.ns_argv(self.ns, [str(NODE_BINARY), *args])
        # nsenter opens both files before it enters either: the node's namespace is named by
        # its path in this mount namespace.
        return ["nsenter", f"--net=/run/netns/{self.ns}", f"--mount=/proc/{self.mount_ns_pid}/ns/mnt",
                "--", str(NODE_BINARY), *args]

    def start(self, *args: str, ready_timeout_s: float = 20.0, **env: str) -> subprocess.Popen[bytes]:
        """Start it with `args` and wait until its control socket answers (`azwi-netproxy-node --check`)."""
        assert self.proc is None or self.proc.poll() is not None, "a node process is already running"
        self._logs += 1
        log = self.base / f"node-{self._logs}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv(*args), env={**self.env, **env}, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, cwd="/")
        deadline = time.monotonic() + ready_timeout_s
        while self.check() != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node process never became ready:\n{self.log()}")
            time.sleep(0.05)
        return self.proc

    def check(self) -> int:
        return subprocess.run([str(NODE_BINARY), "--check"], env=self.env, capture_output=True,
                              timeout=30, check=False).returncode

    def stop(self, *, kill: bool = False) -> int | None:
        """Stop it (SIGTERM, or SIGKILL as a crash); its exit code (None if none ran)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if kill and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_process(proc, timeout_s=10)
        return proc.returncode

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.base.glob("node-*.log")))

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries


# ---- one node driven by the spec-driven runtime (test_node_mode) -----------------------------


@dataclass(kw_only=True)
class NodePod(KubeletPod):
    """A pod of `NodeMode`: a kubelet pod plus its runtime handle."""

    index: int
    runtime: Runtime


@dataclass
class NodeMode:
    base: Path
    node: Node
    conflist: dict[str, Any]
    node_ns: str
    imds_ns: str
    sts: FakeSts
    pods_dir: Path
    process: NodeProcess
    stack: contextlib.ExitStack
    pods: list[NodePod] = field(default_factory=list)

    # ---- the fake Entra ----

    def add_app(self, client_id: str, *pods: NodePod) -> None:
        self.sts.add_app(client_id, *pods)

    def exchanges(self) -> list[dict[str, Any]]:
        return self.sts.exchanges()

    # ---- pods ----

    def new_pod(self, *, service_account: str | None = None, namespace: str | None = None,
                issuer: str | None = None) -> NodePod:
        """A pod's namespace (eth0-like veth to IMDS, default route) and kubelet dir; no ADD yet."""
        index = len(self.pods)
        ns = self.stack.enter_context(netns.namespace("aznpod"))
        pod_addr, imds_addr = f"198.19.{index}.1", f"198.19.{index}.2"
        netns.connect(ns, self.imds_ns, near_addr=pod_addr, far_addr=imds_addr)
        netns.add_route(ns, "0.0.0.0/0", imds_addr)
        uid = str(uuid.uuid4())
        namespace = namespace or f"team-{uuid.uuid4().hex[:6]}"
        name = f"app-{index}"
        runtime = Runtime([self.node.bin_dir, REFERENCE_PLUGINS], container_id=uuid.uuid4().hex,
                          netns=f"/run/netns/{ns}",
                          args={"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name,
                                "K8S_POD_INFRA_CONTAINER_ID": "x", "K8S_POD_UID": uid})
        pod = NodePod(ns=ns, index=index, uid=uid, namespace=namespace, name=name,
                      service_account=service_account or "workload",
                      issuer=issuer or f"https://oidc.prod-aks.azure.com/{new_guid()}/",
                      kubelet_dir=kubelet_dir(self.pods_dir, uid), runtime=runtime)
        self.pods.append(pod)
        return pod

    def add(self, pod: NodePod, annotations: Mapping[str, str] | None = None, *,
            node_mode: bool = True) -> Outcome:
        """ADD through the node's conflist, as the runtime does; the pod annotated for node
        mode (unless `node_mode` is False) plus `annotations`."""
        asked = {"azwi-netproxy.io/node-proxy": "true"} if node_mode else {}
        pod.runtime.annotations = {**asked, **(annotations or {})}
        return pod.runtime.add(self.conflist)

    def delete(self, pod: NodePod) -> Outcome:
        return pod.runtime.delete(self.conflist)

    # ---- the node process ----

    @property
    def node_proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc

    def start_node(self, *args: str, ready_timeout_s: float = 20.0, **env: str) -> subprocess.Popen[bytes]:
        """Start the node process in NODE (root, as the DaemonSet's container) with `args`
        and wait until its control socket answers (`azwi-netproxy-node --check`)."""
        return self.process.start(*args, ready_timeout_s=ready_timeout_s, **env)

    def stop_node(self, *, kill: bool = False) -> None:
        self.process.stop(kill=kill)

    def node_log(self) -> str:
        return self.process.log()

    def node_log_entries(self) -> list[dict[str, Any]]:
        return self.process.log_entries()


@contextlib.contextmanager
def node_mode(python_env: Mapping[str, str] | None = None, **node_env_extra: str) -> Iterator[NodeMode]:
    """A node with the CNI agent running, a fake Entra in STS and no pods yet; the node
    process is not started (tests start it, with `node_env_extra` added to its environment)."""
    with contextlib.ExitStack() as stack:
        made = stack.enter_context(node(cluster_conflist()))
        made.start_agent()
        base = shared_tempdir("azwi-node-mode-")
        stack.callback(shutil.rmtree, base, True)
        node_ns = stack.enter_context(netns.namespace("aznode"))
        imds_ns = stack.enter_context(netns.namespace("aznimds"))
        sts_ns = stack.enter_context(netns.namespace("aznsts"))
        _node_if, imds_if = netns.connect(node_ns, imds_ns, near_addr="198.18.0.1", far_addr=NODE_IMDS_ADDR)
        netns.add_address(imds_ns, imds_if, METADATA_IP)
        netns.add_route(node_ns, f"{METADATA_IP}/32", NODE_IMDS_ADDR)
        netns.connect(node_ns, sts_ns, near_addr="198.18.1.1", far_addr=STS_ADDR)
        sts = start_sts(stack, base, sts_ns, STS_ADDR)
        pods_dir = base / "kubelet-pods"
        pods_dir.mkdir(mode=0o750)
        process = NodeProcess(base, node_ns, node_env(sts, pods_dir=pods_dir, run_dir=made.run_dir,
                                                      python_env=python_env, **node_env_extra))
        mode = NodeMode(base=base, node=made, conflist=made.conflist(), node_ns=node_ns, imds_ns=imds_ns,
                        sts=sts, pods_dir=pods_dir, process=process, stack=stack)
        stack.callback(process.stop)
        yield mode


def fds_naming(pid: int, target: str) -> int:
    """How many of `pid`'s descriptors link to `target` (e.g. 'net:[4026532...]')."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                count += 1
    return count


def netns_link(ns: str) -> str:
    """The nsfs link text of a named namespace, as /proc/PID/fd and /proc/PID/ns show it."""
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


# ---- what touched a directory: the kernel's inotify, not the product's word ------------------

_IN_ACCESS, _IN_OPEN = 0x00000001, 0x00000020
_IN_NONBLOCK = 0o4000
_libc = ctypes.CDLL(None, use_errno=True)


class Opened:
    """Every open or read of anything in the given directories (and of the directories
    themselves, listing included), from the moment this is made until `events()`."""

    def __init__(self, directories: list[Path]) -> None:
        self._fd = _libc.inotify_init1(_IN_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._watches: dict[int, Path] = {}
        for directory in directories:
            wd = _libc.inotify_add_watch(self._fd, str(directory).encode(), _IN_ACCESS | _IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
            self._watches[wd] = directory

    def events(self) -> list[str]:
        """What was opened or read since the last call (path and event)."""
        found: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                found.append(f"{self._watches.get(wd)}/{name} mask={mask:#x}")
                offset += 16 + length

    def close(self) -> None:
        os.close(self._fd)


def tree(root: Path) -> list[Path]:
    """`root` and every directory under it (symlinks not followed)."""
    return [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]


def sockets_of(ns: str, pid: int) -> list[str]:
    """The TCP sockets in namespace `ns` that process `pid` holds (ss, the kernel's view)."""
    done = netns.run_in(ns, ["ss", "-Htanp"])
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if f"pid={pid}," in line]


def anonymous_kb(pid: int) -> int:
    """The process's anonymous memory (what each one really pays), from smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError(f"no Anonymous line for {pid}")
