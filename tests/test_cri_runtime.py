"""containerd's CRI plugin calls a chained CNI plugin with the pod's annotations: the proof.

A private containerd 1.6 (Debian's package, support.cri) creates pod sandboxes through the
CRI v1 API, as the kubelet would, with the conflist a node running our plugin has: the
reference `loopback`, a stand-in for the cluster's network plugin (`podnet`: eth0 and a
default route into the harness's own node namespace), and a recording stand-in for ours
(support/cni_recorder.py) that declares the `io.kubernetes.cri.pod-annotations` capability.
What the recorder logs is what containerd gave it; the test judges it against what the test
itself asked CRI for and against what the kernel says (/proc, `ip`, `ss`), not against the
harness's own view.

One containerd per module (it starts in well under a second); the cleanup tests start
their own, because what they check is that one's removal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import cri
from support.caps import CAN_NETNS, NETNS_SKIP_REASON

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

_SKIP = cri.skip_reason() or ("" if CAN_NETNS else NETNS_SKIP_REASON)
needs_containerd = pytest.mark.skipif(bool(_SKIP), reason=_SKIP or "containerd can run")

REDIRECT = "azwi-netproxy.io/redirect"
PROXY_PORT = "azwi-netproxy.io/proxy-port"
CAPABILITY = "io.kubernetes.cri.pod-annotations"


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctrd() -> Iterator[cri.Containerd]:
    """Name: ctrd. Scope: module. Depends: support.cri. One private containerd, its CRI."""
    if _SKIP:
        pytest.skip(_SKIP)
    with cri.containerd() as running:
        yield running


@pytest.fixture
def records(ctrd: cri.Containerd) -> Iterator[tuple[Path, Path]]:
    """Name: records. Scope: function. Depends: ctrd.

    Makes the chain loopback → podnet → recorder (with the annotations capability) →
    recorder (without it), each recorder writing to a fresh file; yields both files. At
    teardown it prints what the recorders and containerd wrote during the test, which
    pytest shows for a failed test only.
    """
    offset = ctrd.log_size()
    tag = uuid.uuid4().hex[:6]
    with_cap, without_cap = ctrd.record_file(f"cap-{tag}"), ctrd.record_file(f"nocap-{tag}")
    ctrd.set_conflist([
        cri.loopback(),
        ctrd.podnet(),
        {"type": "azwi-test-recorder", "recordFile": str(with_cap),
         "capabilities": {CAPABILITY: True}},
        {"type": "azwi-test-recorder", "recordFile": str(without_cap)},
    ])
    yield with_cap, without_cap
    for path in (with_cap, without_cap):
        print(f"--- {path.name}", *(json.dumps(r, sort_keys=True) for r in cri.read_records(path)),
              sep="\n")
    print("--- containerd's log during the test", ctrd.log_since(offset), sep="\n")


def calls(path: Path, command: str, container_id: str) -> list[dict[str, Any]]:
    return [r for r in cri.read_records(path)
            if r["command"] == command and r["env"].get("CNI_CONTAINERID") == container_id]


def cni_args(record: dict[str, Any]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in record["env"]["CNI_ARGS"].split(";") if pair)


def link(ns_view: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(entry for entry in ns_view if entry["ifname"] == name)


def sandbox_ids(ctrd: cri.Containerd) -> set[str]:
    return {item.id for item in ctrd.cri.list_pod_sandbox()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---- the vendored API subset is containerd's own ---------------------------------------


@pytest.mark.skipif(not os.access(cri.CONTAINERD, os.R_OK) or bool(cri.skip_reason()),
                    reason=cri.skip_reason() or f"needs {cri.CONTAINERD}")
def test_vendored_cri_subset_matches_the_descriptor_containerd_was_built_with() -> None:
    server = cri.embedded_cri_descriptor()
    ours = cri.proto_file_descriptor()
    from google.protobuf import descriptor_pb2

    mine = descriptor_pb2.FileDescriptorProto()
    ours.CopyToProto(mine)
    assert mine.package == server.package == "runtime.v1"

    def messages(proto: Any, prefix: str = "") -> dict[str, Any]:
        found = {}
        for message in proto.message_type if hasattr(proto, "message_type") else proto.nested_type:
            found[prefix + message.name] = message
            found.update(messages(message, prefix + message.name + "."))
        return found

    server_messages, my_messages = messages(server), messages(mine)
    assert len(my_messages) >= 30
    for name, message in my_messages.items():
        assert name in server_messages, f"{name} is not in containerd's api.proto"
        theirs = {f.name: f for f in server_messages[name].field}
        for field in message.field:
            assert field.name in theirs, f"{name}.{field.name} is not in containerd's api.proto"
            other = theirs[field.name]
            assert (field.number, field.type, field.label, field.type_name) == (
                other.number, other.type, other.label, other.type_name
            ), f"{name}.{field.name} differs from containerd's"
    server_enums = {e.name: e for e in server.enum_type}
    for name, message in server_messages.items():
        server_enums.update({f"{name}.{e.name}": e for e in message.enum_type})
    my_enums = {e.name: e for e in mine.enum_type}
    for name, message in my_messages.items():
        my_enums.update({f"{name}.{e.name}": e for e in message.enum_type})
    for name, enum in my_enums.items():
        assert [(v.name, v.number) for v in enum.value] == [
            (v.name, v.number) for v in server_enums[name].value], name
    server_methods = {m.name: m for s in server.service if s.name == "RuntimeService"
                      for m in s.method}
    for method in mine.service[0].method:
        other = server_methods[method.name]
        assert (method.input_type, method.output_type, method.server_streaming) == (
            other.input_type, other.output_type, other.server_streaming), method.name


# ---- containerd, CRI and the chain -------------------------------------------------------


@needs_containerd
def test_cri_answers_version_and_loads_our_conflist(ctrd: cri.Containerd,
                                                   records: tuple[Path, Path]) -> None:
    version = ctrd.cri.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_version.startswith("1.6")
    assert version.runtime_api_version == "v1"
    info = json.loads(dict(ctrd.cri.status(verbose=True).info)["cniconfig"])
    plugins = [[p["Network"]["type"] for p in net["Config"]["Plugins"]] for net in info["Networks"]]
    # CRI's own cni-loopback, then ours: nothing that could reach the host's network.
    assert plugins == [["loopback"], ["loopback", "azwi-test-podnet", "azwi-test-recorder",
                                      "azwi-test-recorder"]]
    assert info["PluginDirs"] == [str(ctrd.bin_dir)]


@needs_containerd
def test_stream_server_listens_on_loopback_only(ctrd: cri.Containerd) -> None:
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in listening.splitlines() if f"pid={ctrd.pid}," in line]
    assert ours, f"containerd {ctrd.pid} has no TCP listener (the stream server is always on)"
    assert all(local.startswith("127.0.0.1:") for local in ours), ours


@needs_containerd
def test_add_gets_the_pods_annotations_netns_and_prev_result(
    ctrd: cri.Containerd, records: tuple[Path, Path]
) -> None:
    with_cap, without_cap = records
    annotations = {REDIRECT: "true", PROXY_PORT: "8001", "example.com/other": "x y"}
    uid = str(uuid.uuid4())
    with ctrd.pod("web", namespace="team-a", uid=uid, annotations=annotations) as pod:
        (add,) = calls(with_cap, "ADD", pod.id)
        env, config = add["env"], add["config"]

        # The annotations arrive exactly, and only for the plugin that declared the capability.
        assert config["runtimeConfig"] == {CAPABILITY: annotations}
        (plain_add,) = calls(without_cap, "ADD", pod.id)
        assert "runtimeConfig" not in plain_add["config"]

        # CNI_NETNS is the pod's own netns (same nsfs inode as the pause process's), and lo
        # was already up in it when we were called.
        assert env["CNI_NETNS"] == pod.netns_path
        assert env["CNI_NETNS"].startswith("/var/run/netns/cni-")
        # In containerd's mount namespace (where plugins run) the path is a netns mount.
        fs_type = ctrd.mnt_run(["stat", "-f", "-c", "%T", env["CNI_NETNS"]]).stdout.strip()
        assert fs_type == "nsfs"
        pod_ns = os.stat(pod.netns_proc)
        assert (add["netns"]["dev"], add["netns"]["ino"]) == (pod_ns.st_dev, pod_ns.st_ino)
        assert os.stat("/proc/self/ns/net").st_ino != pod_ns.st_ino
        assert "UP" in link(add["netns"]["links"], "lo")["flags"]
        seen_now = json.loads(ctrd.netns_run(pod, ["ip", "-j", "link", "show", "lo"]).stdout)
        assert "UP" in seen_now[0]["flags"]

        # prevResult holds loopback's lo and podnet's eth0, in the config's version.
        prev = config["prevResult"]
        assert config["cniVersion"] == prev["cniVersion"] == "1.0.0"
        names = [i["name"] for i in prev["interfaces"]]
        assert names == ["lo", "eth0"]
        assert all(i["sandbox"] == pod.netns_path for i in prev["interfaces"])
        by_address = {ip["address"]: ip["interface"] for ip in prev["ips"]}
        assert by_address["127.0.0.1/8"] == names.index("lo")
        assert by_address[f"{pod.ip}/30"] == names.index("eth0")

        # The rest of what the runtime passes, as the spec and CRI define it.
        assert env["CNI_COMMAND"] == "ADD"
        assert env["CNI_IFNAME"] == "eth0"
        assert env["CNI_PATH"] == str(ctrd.bin_dir)
        assert cni_args(add) == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "team-a",
                                 "K8S_POD_NAME": "web", "K8S_POD_UID": uid,
                                 "K8S_POD_INFRA_CONTAINER_ID": pod.id}
        assert add["argv0"] == str(ctrd.bin_dir / "azwi-test-recorder")
        # A clean environment: containerd's own (what systemd gives a service), with its
        # opt plugin's dirs in front; Python adds LC_CTYPE itself (PEP 538).
        extra = {k for k in env if not k.startswith("CNI_")}
        assert extra <= {"PATH", "LD_LIBRARY_PATH", "PWD", "LC_CTYPE"}, extra
        assert env["PATH"].endswith(cri.CLEAN_ENV["PATH"])

        # What CRI reports: the sandbox is ready, with podnet's IP and our annotations.
        status, info = ctrd.sandbox_status(pod.id)
        assert status.state == 0  # SANDBOX_READY
        assert dict(status.annotations) == annotations
        assert status.network.ip == pod.ip
        assert info["pid"] == pod.pid and alive(pod.pid)
        assert not calls(with_cap, "DEL", pod.id)
    (first_del, *later) = calls(with_cap, "DEL", pod.id)
    assert first_del["env"]["CNI_NETNS"] == pod.netns_path
    assert first_del["config"]["runtimeConfig"] == {CAPABILITY: annotations}
    assert first_del["config"]["prevResult"] == prev
    # RemovePodSandbox tears the network down once more, with the netns already gone: a
    # DEL with an empty CNI_NETNS and no prevResult, which the real plugin must accept.
    assert [d["env"]["CNI_NETNS"] for d in later] in ([], [""])
    assert pod.id not in sandbox_ids(ctrd)
    assert not alive(pod.pid)


@needs_containerd
def test_stop_pod_sandbox_calls_del_and_releases_the_netns(
    ctrd: cri.Containerd, records: tuple[Path, Path]
) -> None:
    with_cap, _ = records
    config = ctrd.cri.sandbox_config("stopped", annotations={REDIRECT: "true"},
                                     cgroup_parent=ctrd.cgroup_parent)
    sandbox_id = ctrd.run_sandbox(config)
    try:
        _, info = ctrd.sandbox_status(sandbox_id)
        netns_name = Path(calls(with_cap, "ADD", sandbox_id)[0]["env"]["CNI_NETNS"]).name
        assert (ctrd.host_run / "netns" / netns_name).exists()
        ctrd.cri.stop_pod_sandbox(sandbox_id)
        (deleted,) = calls(with_cap, "DEL", sandbox_id)
        assert deleted["env"]["CNI_NETNS"].endswith(netns_name)
        status, _ = ctrd.sandbox_status(sandbox_id)
        assert status.state == 1  # SANDBOX_NOTREADY
        assert not alive(int(info["pid"]))
        # containerd removed the netns (visible from here as the file under its /run).
        assert not (ctrd.host_run / "netns" / netns_name).exists()
        veths = json.loads(subprocess.run(["ip", "-n", ctrd.node_netns, "-j", "link"],
                                          capture_output=True, text=True, check=True).stdout)
        assert [v["ifname"] for v in veths] == ["lo"]
    finally:
        ctrd.remove_sandbox(sandbox_id)
    assert sandbox_id not in sandbox_ids(ctrd)


@needs_containerd
def test_pod_without_annotations_gets_null_not_a_map(
    ctrd: cri.Containerd, records: tuple[Path, Path]
) -> None:
    with_cap, _ = records
    with ctrd.pod("plain") as pod:
        (add,) = calls(with_cap, "ADD", pod.id)
    # containerd 1.6 still passes the capability, with Go's nil map: JSON null. The real
    # plugin must read that as "no annotations", not fail on it.
    assert add["config"]["runtimeConfig"] == {CAPABILITY: None}


@needs_containerd
def test_failed_chained_add_fails_the_sandbox(
    ctrd: cri.Containerd, records: tuple[Path, Path]
) -> None:
    import grpc

    with_cap, without_cap = records
    before = sandbox_ids(ctrd)
    config = ctrd.cri.sandbox_config("refused", annotations={"azwi-netproxy.test/fail-add": "true"},
                                     cgroup_parent=ctrd.cgroup_parent)
    with pytest.raises(grpc.RpcError) as failed:
        ctrd.run_sandbox(config)
    # containerd surfaces the plugin's own error message to the kubelet.
    assert "recorder: ADD refused for this pod" in failed.value.details()
    assert sandbox_ids(ctrd) == before
    (add,) = [r for r in cri.read_records(with_cap) if r["command"] == "ADD"]
    sandbox_id = add["env"]["CNI_CONTAINERID"]
    # Nothing after the failed plugin ran, and the chain was torn down (DEL) at once.
    assert not calls(without_cap, "ADD", sandbox_id)
    assert calls(with_cap, "DEL", sandbox_id)
    assert not (ctrd.host_run / "netns" / Path(add["env"]["CNI_NETNS"]).name).exists()
    veths = json.loads(subprocess.run(["ip", "-n", ctrd.node_netns, "-j", "link"],
                                      capture_output=True, text=True, check=True).stdout)
    assert [v["ifname"] for v in veths] == ["lo"]
    # The kubelet retries with the next attempt: that one succeeds once ADD does.
    with ctrd.pod("refused-then-fine") as pod:
        assert calls(with_cap, "ADD", pod.id)


# ---- cleanup, also when the test fails -----------------------------------------------------


def _traces(ctrd: cri.Containerd) -> dict[str, Any]:
    """Everything of `ctrd` the host could still hold (all empty/False once it is gone)."""
    mountinfo = Path("/proc/self/mountinfo").read_text()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{ctrd.cgroup_parent.lstrip('/')}")]
    return {
        "dir": ctrd.dir.exists(),
        "mounts": [line for line in mountinfo.splitlines() if str(ctrd.dir) in line],
        "node_netns": ctrd.node_netns in netns.split(),
        "cgroups": cgroups,
    }


def _shim_pids(ctrd: cri.Containerd) -> list[int]:
    """The shims serving `ctrd`, by the socket they were started with."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"containerd-shim-runc-v2") and str(ctrd.socket).encode() in argv:
            found.append(int(entry.name))
    return found


@needs_containerd
def test_a_failing_block_still_removes_every_trace() -> None:
    class Boom(Exception):
        pass

    seen: dict[str, Any] = {}
    with pytest.raises(Boom), cri.containerd() as doomed:
        doomed.set_conflist([cri.loopback(), doomed.podnet()])
        config = doomed.cri.sandbox_config("left-running", cgroup_parent=doomed.cgroup_parent)
        sandbox_id = doomed.run_sandbox(config)  # never stopped by the test: the harness must
        _, info = doomed.sandbox_status(sandbox_id)
        seen.update(ctrd=doomed, containerd=doomed.pid, pause=int(info["pid"]),
                    shims=_shim_pids(doomed))
        assert seen["shims"] and all(alive(p) for p in seen["shims"])
        assert _traces(doomed)["cgroups"]
        raise Boom
    doomed = seen["ctrd"]
    assert not any(alive(p) for p in [seen["containerd"], seen["pause"], *seen["shims"]])
    assert _traces(doomed) == {"dir": False, "mounts": [], "node_netns": False, "cgroups": []}


@needs_containerd
def test_a_crashed_containerd_still_leaves_nothing_behind() -> None:
    seen: dict[str, Any] = {}
    # The harness says what it had to kill: a test that leaves processes behind is a bug.
    with pytest.raises(cri.ContainerdError, match="killed leftover process"), \
            cri.containerd() as crashing:
        crashing.set_conflist([cri.loopback(), crashing.podnet()])
        sandbox_id = crashing.run_sandbox(
            crashing.cri.sandbox_config("orphan", cgroup_parent=crashing.cgroup_parent))
        _, info = crashing.sandbox_status(sandbox_id)
        seen.update(ctrd=crashing, pause=int(info["pid"]), shims=_shim_pids(crashing))
        assert seen["shims"]
        # containerd dies with a sandbox running: its shim and pause survive it, as on a
        # node, and only the harness's PID bookkeeping can find them.
        os.kill(crashing.pid, signal.SIGKILL)
        crashing.process.wait(timeout=10)  # type: ignore[union-attr]
        assert alive(seen["pause"]) and all(alive(p) for p in seen["shims"])
    assert not any(alive(p) for p in [seen["pause"], *seen["shims"]])
    assert _traces(seen["ctrd"]) == {"dir": False, "mounts": [], "node_netns": False,
                                     "cgroups": []}
