"""A private containerd 1.6 driven through its CRI plugin, so that containerd calls our CNI chain.

Name: support.cri
Scope: `containerd(...)` is a context manager for one containerd (a module's worth of
    sandboxes): its own root, state, socket, config, CNI bin and conf dirs, sandbox image
    and "node" network namespace, all under one unique temp dir, and all removed when the
    block ends, even when it raises. `Containerd.pod(...)` runs one pod sandbox through CRI
    and stops and removes it when its block ends.
Depends: root; Debian's containerd (1.6, with the CRI v1 API), runc and
    containernetworking-plugins (for `loopback`); util-linux unshare and nsenter; iproute2;
    gcc with a static libc (libc6-dev) for the pause binary; grpcio and grpcio-tools (protoc)
    in the test venv. `skip_reason()` says which is missing.

What it must not touch, and how it keeps off:
- The host's containerd: never the system service, /run/containerd, /var/lib/containerd or
  /etc/containerd. containerd runs in a private mount namespace (`unshare --mount
  --propagation private`) where /run and /var/lib are bind mounts of dirs under the temp dir,
  because some paths are fixed in containerd 1.6 and libcni whatever the config says: the
  shims' sockets (/run/containerd/s/<hash>), the pods' netns (/var/run/netns/cni-<uuid>),
  libcni's result cache (/var/lib/cni). Every mount containerd, its shims and runc make
  lives in that namespace only, and goes away with its last process.
- The host's network: the conflist is what the test writes (loopback, the `podnet`
  stand-in for the cluster's network plugin, the chained plugin under test), and podnet
  links each pod only to this harness's own node namespace. The CRI stream server listens on
  127.0.0.1 only, on a port the kernel picks. No AppArmor profile is loaded into the host
  kernel (`disable_apparmor`), no systemd is asked for cgroups (cgroupfs, under a unique
  parent the harness removes).
- Processes: only those it started, by PID (containerd; its pause processes found by the
  init.pid files in its own state dir, its shims by their mount namespace and socket).

Driving it from a test (the lead's CNI tests build on this):

    with cri.containerd() as ctrd:                      # module scope: ~0.2 s to start
        ctrd.install_plugin("azwi-netproxy", path)      # an executable copied into bin_dir
        ctrd.set_conflist([cri.loopback(), ctrd.podnet(), {"type": "azwi-netproxy", ...}])
        ctrd.wait_chained()                             # or, with an agent that chains it: its rewrite
        with ctrd.pod("web", annotations={...}) as pod: # RunPodSandbox ... Stop + Remove
            pod.id, pod.pid, pod.netns_path, pod.ip
            ctrd.netns_run(pod, ["nft", "list", "ruleset"])  # a command in the pod's netns
            name = cri.attach_netns(pod, "azcripod")    # an `ip netns` name, until detach_netns
        ctrd.cri.run_pod_sandbox(...)                   # the raw calls, for failure cases
    ctrd.node_netns                                     # `ip netns exec` name of the node side

CNI_NETNS as containerd passes it (/var/run/netns/cni-...) exists only inside containerd's
mount namespace; from the test, reach the pod's netns as /proc/<pod.pid>/ns/net (what
`netns_run` uses) or run a command in containerd's mount namespace with `ctrd.mnt_run`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent
PROTO = SUPPORT / "cri_api.proto"
PAUSE_SOURCE = SUPPORT / "pause.c"
RECORDER = SUPPORT / "cni_recorder.py"
PODNET = SUPPORT / "cni_podnet.py"

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SHIM = "/usr/bin/containerd-shim-runc-v2"
RUNC = "/usr/sbin/runc"
CNI_LOOPBACK = "/usr/lib/cni/loopback"
# What systemd gives a service: the plugins containerd runs inherit exactly this.
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
K8S_NAMESPACE = "k8s.io"  # the containerd namespace CRI keeps its images and sandboxes in
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
START_TIMEOUT_S = 30.0

_names = itertools.count()


class ContainerdError(RuntimeError):
    """containerd or a CRI call failed; the message ends with containerd's log tail."""


# ---- can it run here? ------------------------------------------------------------------


def skip_reason() -> str | None:
    """None when this machine can run the harness, else what is missing (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (containerd, network and mount namespaces)"
    for path in (CONTAINERD, CTR, SHIM, RUNC, CNI_LOOPBACK):
        if not os.access(path, os.X_OK):
            return (f"needs {path} (Debian's containerd, runc and containernetworking-plugins: "
                    "scripts/bootstrap.sh installs them)")
    for tool in ("unshare", "nsenter", "ip", "gcc", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (scripts/bootstrap.sh installs it)"
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as exc:
        return f"needs grpcio and grpcio-tools in the test venv ({exc})"
    return None


# ---- the CRI v1 client ------------------------------------------------------------------


@functools.cache
def cri_api() -> dict[str, Any]:
    """Message classes of tests/support/cri_api.proto, compiled by protoc once per process.

    protoc (grpcio-tools) writes a descriptor set; the classes are built from it in a private
    descriptor pool rather than imported as generated modules, so nothing lands on sys.path
    and the default pool stays free for anything else that knows `runtime.v1`.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="azwi-cri-proto-") as out:
        descriptor_set = Path(out) / "cri_api.pb"
        status = protoc.main([
            "protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={descriptor_set}",
            str(PROTO),
        ])
        if status != 0:
            raise RuntimeError(f"protoc could not compile {PROTO} (status {status})")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    package = pool.FindFileByName(PROTO.name)
    api: dict[str, Any] = {name: message_factory.GetMessageClass(desc)
                           for name, desc in package.message_types_by_name.items()}
    api["_file"] = package
    return api


def proto_file_descriptor() -> Any:
    """The FileDescriptor of our vendored subset (to compare with the server's own)."""
    return cri_api()["_file"]


def embedded_cri_descriptor(binary: str = CONTAINERD) -> Any:
    """The FileDescriptorProto of `runtime.v1` api.proto that `binary` was built with.

    gogo/protobuf-generated Go code registers each .proto file as a gzipped
    FileDescriptorProto, so the server's schema can be read from the binary itself: the
    authority our subset's field numbers are checked against.
    """
    from google.protobuf import descriptor_pb2

    data = Path(binary).read_bytes()
    start = 0
    while (start := data.find(b"\x1f\x8b\x08\x00\x00\x00\x00\x00", start)) >= 0:
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:start + (4 << 20)])
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # most gzip-looking bytes in a binary are not a descriptor
            proto = None
        if proto is not None and proto.package == "runtime.v1" and proto.service:
            return proto
        start += 1
    raise LookupError(f"no gzipped runtime.v1 descriptor in {binary}")


class CriClient:
    """The CRI v1 RuntimeService calls the tests need, over containerd's unix socket."""

    SERVICE = "/runtime.v1.RuntimeService/"

    def __init__(self, socket_path: Path) -> None:
        import grpc

        self._grpc = grpc
        self._api = cri_api()
        # No proxy can apply to a unix socket, but grpc reads http_proxy for other targets:
        # keep it from ever considering one.
        self._channel = grpc.insecure_channel(f"unix://{socket_path}",
                                              options=[("grpc.enable_http_proxy", 0)])

    def close(self) -> None:
        self._channel.close()

    def msg(self, message: str, /, **fields: Any) -> Any:
        """A message of the vendored subset, e.g. `msg("PodSandboxMetadata", name="x")`."""
        return self._api[message](**fields)

    def call(self, method: str, request: Any, response: str, *, timeout_s: float = 60.0) -> Any:
        """One unary RPC; grpc.RpcError propagates (its .details() is containerd's message)."""
        stub = self._channel.unary_unary(
            self.SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=self._api[response].FromString,
        )
        return stub(request, timeout=timeout_s)

    # The calls, named as CRI names them.

    def version(self) -> Any:
        return self.call("Version", self.msg("VersionRequest", version="v1"), "VersionResponse",
                         timeout_s=5.0)

    def status(self, *, verbose: bool = False) -> Any:
        return self.call("Status", self.msg("StatusRequest", verbose=verbose), "StatusResponse",
                         timeout_s=10.0)

    def run_pod_sandbox(self, config: Any, *, timeout_s: float = 120.0) -> str:
        request = self.msg("RunPodSandboxRequest", config=config)
        return self.call("RunPodSandbox", request, "RunPodSandboxResponse",
                         timeout_s=timeout_s).pod_sandbox_id

    def pod_sandbox_status(self, sandbox_id: str, *, verbose: bool = True) -> Any:
        request = self.msg("PodSandboxStatusRequest", pod_sandbox_id=sandbox_id, verbose=verbose)
        return self.call("PodSandboxStatus", request, "PodSandboxStatusResponse")

    def list_pod_sandbox(self) -> list[Any]:
        return list(self.call("ListPodSandbox", self.msg("ListPodSandboxRequest"),
                              "ListPodSandboxResponse").items)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self.call("StopPodSandbox", self.msg("StopPodSandboxRequest", pod_sandbox_id=sandbox_id),
                  "StopPodSandboxResponse")

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self.call("RemovePodSandbox",
                  self.msg("RemovePodSandboxRequest", pod_sandbox_id=sandbox_id),
                  "RemovePodSandboxResponse")

    def sandbox_config(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        cgroup_parent: str = "",
        attempt: int = 0,
    ) -> Any:
        """A PodSandboxConfig as the kubelet builds one for a pod without host namespaces.

        Its Linux security context is the kubelet's for a pod that sets nothing privileged:
        the pod's own network and IPC namespaces, a PID namespace per container, not
        privileged, the runtime's default seccomp profile (as Pod Security `restricted`
        requires). The kubelet also labels the sandbox with the pod's identity.
        """
        uid = uid or str(uuid.uuid4())
        all_labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                      "io.kubernetes.pod.uid": uid, **(labels or {})}
        security = self.msg(
            "LinuxSandboxSecurityContext",
            namespace_options=self.msg("NamespaceOption", network=0, pid=1, ipc=0),  # POD, CONTAINER, POD
            privileged=False,
            seccomp=self.msg("SecurityProfile", profile_type=0),  # RuntimeDefault
        )
        return self.msg(
            "PodSandboxConfig",
            metadata=self.msg("PodSandboxMetadata", name=name, uid=uid, namespace=namespace,
                              attempt=attempt),
            hostname=name,
            labels=all_labels,
            annotations=dict(annotations or {}),
            linux=self.msg("LinuxPodSandboxConfig", cgroup_parent=cgroup_parent,
                           security_context=security),
        )


# ---- the sandbox image ------------------------------------------------------------------


def _go_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _blob(data: bytes) -> tuple[str, int]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def build_pause_image(workdir: Path, name: str) -> Path:
    """An OCI image archive holding only a static /pause (built here: no registry exists).

    The binary does what the kubelet's pause does (sleep, reap orphans, exit on SIGINT or
    SIGTERM), which is all a sandbox's process has to do.
    """
    binary = workdir / "pause"
    built = subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise ContainerdError(f"cannot build the pause binary (static libc from libc6-dev?): "
                              f"{built.stderr.strip()}")
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer_tar:
        _tar_add(layer_tar, "pause", binary.read_bytes(), mode=0o755)
    layer = layer_buffer.getvalue()
    layer_digest, layer_size = _blob(layer)
    # The layer is stored uncompressed, so its diff id is its digest.
    config = json.dumps({
        "architecture": _go_arch(), "os": "linux",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    config_digest, config_size = _blob(config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    }, sort_keys=True).encode()
    manifest_digest, manifest_size = _blob(manifest)
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": _go_arch(), "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    }, sort_keys=True).encode()
    archive = workdir / "pause-image.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _tar_add(tar, "index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config),
                             (manifest_digest, manifest)):
            _tar_add(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    binary.unlink()
    return archive


# ---- conflist pieces ----------------------------------------------------------------------


def loopback() -> dict[str, Any]:
    """The reference loopback plugin's entry (Debian's /usr/lib/cni/loopback)."""
    return {"type": "loopback"}


# ---- containerd --------------------------------------------------------------------------

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
# Snapshotters that cannot work here or would probe the host's disks. (Not the v1 runtime,
# io.containerd.runtime.v1.linux, unused as it is: 1.6's tasks service, and so CRI, need it.)
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""
  level = "{log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  # The stream server (exec/attach/port-forward) always starts: loopback only, any port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  # Loading containerd's AppArmor profile would change the host kernel's policy.
  disable_apparmor = true
  enable_selinux = false
  # CRI gives a sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which root
  # lacks on these machines (runc's nsexec: "failed to update /proc/self/oom_score_adj:
  # Permission denied"). Restricted, CRI never asks for less than containerd's own score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""

# Runs inside the new mount namespace; $1 is the temp dir. Bind mounts, not tmpfs, so the
# test can read what containerd wrote under /run and /var/lib (under $1/host-run ...).
_ENTER = """\
set -eu
mount --bind "$1/host-run" /run
mount --bind "$1/host-var-lib" /var/lib
exec "$2" --config "$1/config.toml"
"""


@dataclass
class Pod:
    """A running pod sandbox: what CRI reported about it."""

    id: str
    name: str
    uid: str
    namespace: str
    pid: int               # the sandbox (pause) process, in the host's PID namespace
    netns_path: str        # CNI_NETNS as containerd passed it (valid in containerd's mount ns)
    ip: str
    info: dict[str, Any]   # PodSandboxStatus(verbose)'s "info" document
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def netns_proc(self) -> str:
        """The pod's network namespace, reachable from the test's mount namespace."""
        return f"/proc/{self.pid}/ns/net"


class Containerd:
    """One private containerd; build it with `containerd()`, not directly."""

    def __init__(self, base: Path, *, snapshotter: str, log_level: str) -> None:
        self.suffix = uuid.uuid4().hex[:8]
        self.dir = base
        self.root = base / "root"
        self.state = base / "state"
        self.socket = base / "containerd.sock"
        self.bin_dir = base / "cni-bin"
        self.conf_dir = base / "cni-conf"
        self.records = base / "records"         # stand-ins' record files go here
        self.host_run = base / "host-run"       # what containerd sees as /run
        self.host_var_lib = base / "host-var-lib"  # ... and as /var/lib
        self.log = base / "containerd.log"
        self.node_netns = f"azcri{self.suffix}"  # the node side of podnet's veths
        self.node_netns_path = base / "node-netns"  # the same, at a path containerd sees
        self.cgroup_parent = f"/azwi-cri-{self.suffix}"
        self.image = f"localhost/azwi-netproxy-test-pause:{self.suffix}"
        self.snapshotter = snapshotter
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.mnt_ns: tuple[int, int] | None = None
        self._cri: CriClient | None = None
        self._node_bound = False
        self._node_made = False

    # -- what tests use --

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            raise ContainerdError("containerd is not running")
        return self._cri

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ContainerdError("containerd is not running")
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def log_size(self) -> int:
        """Where containerd's log ends now (for `log_since`)."""
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        """What containerd logged after `offset`: one test's share of a module's containerd."""
        try:
            with self.log.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def install_plugin(self, plugin_type: str, source: Path) -> Path:
        """Copy an executable into the CNI bin dir under the name a conflist's `type` uses."""
        target = self.bin_dir / plugin_type
        shutil.copyfile(source, target)
        target.chmod(0o755)
        return target

    def record_file(self, name: str) -> Path:
        """A fresh path for a stand-in's `recordFile` (readable from the test directly)."""
        path = self.records / f"{name}.jsonl"
        path.unlink(missing_ok=True)
        return path

    def podnet(self, subnet: str = "198.18.128.0/17") -> dict[str, Any]:
        """The conflist entry of the stand-in network plugin (eth0 + default route per pod)."""
        return {"type": "azwi-test-podnet", "nodeNetns": str(self.node_netns_path),
                "stateDir": str(self.dir / "podnet"), "subnet": subnet}

    def set_conflist(self, plugins: Sequence[Mapping[str, Any]], *, cni_version: str = "1.0.0",
                     name: str | None = None, timeout_s: float = 20.0) -> dict[str, Any]:
        """Make `plugins` containerd's only network, and wait until CRI has loaded it.

        CRI watches conf_dir and reloads on a change; the new conflist gets a fresh network
        name so that CRI's status proves which one is live. Returns the conflist written.
        """
        name = name or f"azwi-test-{self.suffix}-{next(_names)}"
        conflist = {"cniVersion": cni_version, "name": name, "plugins": [dict(p) for p in plugins]}
        for old in self.conf_dir.iterdir():
            old.unlink()
        # Staged inside conf_dir under a name libcni skips (it reads only .conf, .conflist
        # and .json), then renamed: the file appears whole, and the rename is what makes
        # CRI reload, since containerd 1.6's conf syncer ignores fsnotify's Create and Chmod
        # events and reloads only on Write, Remove and Rename (of the old name).
        staged = self.conf_dir / "10-azwi-test.conflist.tmp"
        staged.write_text(json.dumps(conflist, indent=2))
        staged.rename(self.conf_dir / "10-azwi-test.conflist")
        deadline = time.monotonic() + timeout_s
        loaded: list[str] = []
        while time.monotonic() < deadline:
            loaded = self.loaded_networks()
            ready = self.network_ready()
            if loaded == [name] and ready:
                return conflist
            time.sleep(0.1)
        raise ContainerdError(f"CRI did not load conflist {name!r} within {timeout_s}s "
                              f"(loaded: {loaded})\n{self.log_tail()}")

    def loaded_networks(self) -> list[str]:
        """Names of the conf_dir networks CRI has loaded (not its built-in cni-loopback)."""
        info = dict(self.cri.status(verbose=True).info)
        cniconfig = json.loads(info.get("cniconfig", "{}"))
        names = [net.get("Config", {}).get("Name", "") for net in cniconfig.get("Networks") or []]
        return [n for n in names if n != "cni-loopback"]

    def loaded_plugins(self) -> list[list[str]]:
        """The plugin types of each network CRI has loaded, in order (its built-in
        cni-loopback first)."""
        info = json.loads(dict(self.cri.status(verbose=True).info)["cniconfig"])
        return [[p["Network"]["type"] for p in net["Config"]["Plugins"]] for net in info["Networks"]]

    def wait_chained(self, plugin_type: str = "azwi-netproxy", *, timeout_s: float = 20.0) -> None:
        """Wait until CRI's live network ends with `plugin_type`.

        An agent chains by rewriting the conflist on its own schedule, so `set_conflist`'s
        wait cannot cover it.
        """
        deadline = time.monotonic() + timeout_s
        while (loaded := self.loaded_plugins())[-1][-1] != plugin_type:
            if time.monotonic() >= deadline:
                raise ContainerdError(f"CRI never loaded the chained conflist: {loaded}\n{self.log_tail()}")
            time.sleep(0.1)

    def network_ready(self) -> bool:
        conditions = self.cri.status().status.conditions
        return any(c.type == "NetworkReady" and c.status for c in conditions)

    def sandbox_status(self, sandbox_id: str) -> tuple[Any, dict[str, Any]]:
        """PodSandboxStatus(verbose): the status message and its decoded "info" document."""
        response = self.cri.pod_sandbox_status(sandbox_id, verbose=True)
        return response.status, json.loads(dict(response.info).get("info", "{}"))

    @contextlib.contextmanager
    def pod(self, name: str, *, annotations: Mapping[str, str] | None = None,
            namespace: str = "default", uid: str | None = None) -> Iterator[Pod]:
        """RunPodSandbox a pod; StopPodSandbox and RemovePodSandbox it when the block ends."""
        config = self.cri.sandbox_config(name, namespace=namespace, uid=uid,
                                         annotations=annotations,
                                         cgroup_parent=self.cgroup_parent)
        sandbox_id = self.run_sandbox(config)
        try:
            status, info = self.sandbox_status(sandbox_id)
            netns = next((ns.get("path", "") for ns in
                          info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
                          if ns.get("type") == "network"), "")
            yield Pod(id=sandbox_id, name=name, uid=config.metadata.uid, namespace=namespace,
                      pid=int(info["pid"]), netns_path=netns, ip=status.network.ip, info=info,
                      annotations=dict(status.annotations))
        finally:
            self.remove_sandbox(sandbox_id)

    def run_sandbox(self, config: Any) -> str:
        """RunPodSandbox; grpc.RpcError propagates (containerd's reason in .details())."""
        return self.cri.run_pod_sandbox(config)

    def remove_sandbox(self, sandbox_id: str) -> None:
        """StopPodSandbox then RemovePodSandbox, as the kubelet does when a pod goes."""
        self.cri.stop_pod_sandbox(sandbox_id)
        self.cri.remove_pod_sandbox(sandbox_id)

    def netns_run(self, pod: Pod, argv: Sequence[str], *, timeout_s: float = 30.0,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run argv in the pod's network namespace (the test's mount namespace)."""
        return _run(["nsenter", f"--net={pod.netns_proc}", *argv], timeout_s, check)

    def mnt_run(self, argv: Sequence[str], *, timeout_s: float = 30.0,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run argv in containerd's mount namespace, where CNI_NETNS paths exist."""
        return _run(["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", *argv], timeout_s, check)

    # -- life cycle --

    def start(self) -> None:
        for directory in (self.root, self.state, self.bin_dir, self.conf_dir, self.records,
                          self.host_run, self.host_var_lib):
            directory.mkdir(parents=True)
        # The node side of the pods' veths: a namespace of its own with lo up (never the
        # root namespace), bound at a path under the temp dir before containerd's mount
        # namespace is made, so that containerd's copy of the mount table has it too.
        _run(["ip", "netns", "add", self.node_netns], 10, True)
        self._node_made = True
        _run(["ip", "-n", self.node_netns, "link", "set", "lo", "up"], 10, True)
        self.node_netns_path.touch()
        _run(["mount", "--bind", f"/run/netns/{self.node_netns}", str(self.node_netns_path)],
             10, True)
        self._node_bound = True
        shutil.copyfile(CNI_LOOPBACK, self.bin_dir / "loopback")
        (self.bin_dir / "loopback").chmod(0o755)
        self.install_plugin("azwi-test-podnet", PODNET)
        self.install_plugin("azwi-test-recorder", RECORDER)
        (self.dir / "config.toml").write_text(_CONFIG.format(
            root=self.root, state=self.state, socket=self.socket, image=self.image,
            snapshotter=self.snapshotter, runc=RUNC, cni_bin=self.bin_dir,
            cni_conf=self.conf_dir, log_level=self.log_level,
        ))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _ENTER,
                 "sh", str(self.dir), CONTAINERD],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=CLEAN_ENV, cwd="/", start_new_session=True,
            )
        self._cri = CriClient(self.socket)
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerdError(f"containerd exited with {self.process.returncode}\n"
                                      f"{self.log_tail()}")
            if self.socket.exists():
                try:
                    version = self.cri.version()
                    if version.runtime_name:
                        break
                except Exception as exc:  # not serving yet, or CRI still initialising
                    last = exc
                    if "failed to load plugin io.containerd.grpc.v1.cri" in self.log_tail(400):
                        raise ContainerdError(f"containerd's CRI plugin did not load\n"
                                              f"{self.log_tail()}") from exc
            time.sleep(0.05)
        else:
            raise ContainerdError(f"containerd's CRI did not answer within {START_TIMEOUT_S}s "
                                  f"({last})\n{self.log_tail()}")
        st = os.stat(f"/proc/{self.pid}/ns/mnt")
        self.mnt_ns = (st.st_dev, st.st_ino)
        self._import_image()

    def _import_image(self) -> None:
        archive = build_pause_image(self.dir, self.image)
        imported = _run([CTR, "--address", str(self.socket), "--namespace", K8S_NAMESPACE,
                         "images", "import", "--snapshotter", self.snapshotter,
                         "--platform", f"linux/{_go_arch()}", str(archive)], 60, False)
        if imported.returncode != 0:
            raise ContainerdError(f"ctr images import failed: {imported.stderr.strip()}\n"
                                  f"{self.log_tail()}")
        archive.unlink()

    def stop(self) -> list[str]:
        """Stop everything this containerd started and remove every trace; returns problems.

        Order: the sandboxes CRI still knows (Stop + Remove, as the kubelet would), then
        containerd (SIGTERM, then SIGKILL), then any pause or shim process still alive
        (see `_our_processes`), then the cgroups,
        the node namespace, and the temp dir. Each step runs even if an earlier one failed.
        """
        problems: list[str] = []
        if self._cri is not None and self.process is not None and self.process.poll() is None:
            try:
                for sandbox in self.cri.list_pod_sandbox():
                    try:
                        self.remove_sandbox(sandbox.id)
                    except Exception as exc:
                        problems.append(f"sandbox {sandbox.id}: {exc}")
            except Exception as exc:
                problems.append(f"ListPodSandbox: {exc}")
        if self._cri is not None:
            self._cri.close()
        leftovers = self._our_processes()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                problems.append("containerd ignored SIGTERM for 15 s")
                self.process.kill()
                self.process.wait(timeout=10)
        leftovers |= self._our_processes()
        if self.process is not None:
            leftovers.discard(self.process.pid)
        for pid in sorted(leftovers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                problems.append(f"killed leftover process {pid}")
        self._wait_gone(leftovers)
        problems += self._remove_cgroups()
        if self._node_bound:
            done = _run(["umount", str(self.node_netns_path)], 10, False)
            if done.returncode != 0:
                problems.append(f"umount {self.node_netns_path}: {done.stderr.strip()}")
        if self._node_made:
            done = _run(["ip", "netns", "del", self.node_netns], 10, False)
            if done.returncode != 0:
                problems.append(f"ip netns del {self.node_netns}: {done.stderr.strip()}")
        mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if str(self.dir) in line]
        if mounted:
            problems.append(f"still mounted under {self.dir}: {mounted}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    def _our_processes(self) -> set[int]:
        """PIDs of this containerd's shims and sandbox processes, and of anything else left
        in its mount namespace.

        Sandbox (pause) processes: from the init.pid runc wrote in our state dir (they live
        in mount namespaces of their own). Shims: in containerd's mount namespace, and
        started with `-address <our socket>` (containerd 1.6 writes no shim.pid).
        """
        pids: set[int] = set()
        tasks = self.state / "io.containerd.runtime.v2.task"
        for pid_file in tasks.glob("*/*/init.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(pid_file.read_text().strip()))
        marker = f"\0-address\0{self.socket}\0".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                st = os.stat(entry / "ns" / "mnt")
                in_our_ns = self.mnt_ns is not None and (st.st_dev, st.st_ino) == self.mnt_ns
                if in_our_ns or marker in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
        return {pid for pid in pids if pid > 1 and pid != os.getpid() and _alive(pid)}

    @staticmethod
    def _wait_gone(pids: set[int], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)

    def _remove_cgroups(self) -> list[str]:
        """rmdir our cgroup parent in every hierarchy, deepest first (cgroupfs allows no rm)."""
        problems = []
        for mount in _cgroup_mounts():
            top = Path(mount) / self.cgroup_parent.lstrip("/")
            if not top.is_dir():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for directory in [*dirs, top]:
                try:
                    directory.rmdir()
                except OSError as exc:
                    problems.append(f"rmdir {directory}: {exc}")
        return problems


def _cgroup_mounts() -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] in ("cgroup", "cgroup2"):
            mounts.append(left.split()[4])
    return mounts


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _run(argv: Sequence[str], timeout_s: float, check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                          env=CLEAN_ENV, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise ContainerdError(f"{' '.join(argv)} failed ({done.returncode}): "
                              f"{done.stderr.strip()}")
    return done


@contextlib.contextmanager
def containerd(parent: Path | None = None, *, snapshotter: str = "overlayfs",
               log_level: str = "info") -> Iterator[Containerd]:
    """Start a private containerd; stop it and remove every trace when the block ends.

    Raises ContainerdError (with containerd's log tail) if it cannot start, and at the end
    of a block that otherwise succeeded if anything could not be cleaned up.
    """
    base = Path(tempfile.mkdtemp(prefix="azwi-cri-", dir=parent or "/tmp"))
    # Socket paths are limited to 108 bytes; keep the base short and readable by all (the
    # stand-in plugins run as root, but the lead's may drop privileges).
    base.chmod(0o755)
    ctrd = Containerd(base, snapshotter=snapshotter, log_level=log_level)
    problems: list[str] = []
    try:
        ctrd.start()
        yield ctrd
    except BaseException:
        # The log goes with the temp dir: show its end now (pytest prints it for a failure).
        print(f"support.cri: containerd's log ended with:\n{ctrd.log_tail(60)}", file=sys.stderr)
        problems = ctrd.stop()
        if problems:  # the block's own error is the one to report; these go alongside it
            print(f"support.cri cleanup after an error: {problems}", file=sys.stderr)
        raise
    problems = ctrd.stop()
    if problems:
        raise ContainerdError("cleanup: " + "; ".join(problems))


def attach_netns(pod: Pod, prefix: str) -> str:
    """An `ip netns` name (`prefix`-<random>) for the pod's namespace, so that the netns
    helpers can reach it; it keeps the namespace alive until `detach_netns`."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    _run(["ip", "netns", "attach", name, str(pod.pid)], 10, True)
    return name


def detach_netns(name: str) -> None:
    """Drop an `attach_netns` name (no error if it is gone already)."""
    _run(["ip", "netns", "delete", name], 10, False)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a recording stand-in wrote (none yet: an empty list)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "ANNOTATIONS_CAPABILITY",
    "CLEAN_ENV",
    "CONTAINERD",
    "PODNET",
    "RECORDER",
    "Containerd",
    "ContainerdError",
    "CriClient",
    "Pod",
    "attach_netns",
    "build_pause_image",
    "containerd",
    "cri_api",
    "detach_netns",
    "embedded_cri_descriptor",
    "loopback",
    "proto_file_descriptor",
    "read_records",
    "skip_reason",
]
