"""Node mode under a real runtime: containerd's CRI makes the pods, our plugin enrols them.

Name: test_node_containerd
Scope: module (`cri_node`: one private containerd, support.cri, with the real node agent
    chaining our plugin after the loopback, the podnet stand-in and the recorder; a fake
    Entra; the node process running; `two_pods`: pods A and B made by RunPodSandbox),
    function (pods of a test's own: the restart, RemovePodSandbox, bad annotations).
Depends: everything support.cri needs (containerd 1.6, runc, containernetworking-plugins,
    grpcio), root + netns + nft, support.nodemode's pieces (kubelet-style pod dirs, the fake
    Entra with per-pod federated apps, the node process, ss and /proc descriptor counts).

Nothing calls the plugin but containerd: RunPodSandbox through CRI with the pod's node-mode
annotations, as the kubelet does; containerd passes the pod's UID (the sandbox config's
metadata) in CNI_ARGS, which the recorder in the chain writes down, and the node process
finds that pod's projected token under its kubelet dir by it. The fake Entra federates C1
only with pod A's service account and C2 only with pod B's, so which token a pod gets is
Entra's judgement of the assertion sent for it. Where traffic lands is judged by curl and by
tripwire listeners on the metadata address in the node's namespace, where a pod's packets
would go if nothing redirected them.

The node process runs in the node's network namespace and in containerd's mount namespace:
containerd keeps each pod's namespace at /var/run/netns/cni-<uuid> (CNI_NETNS, the path the
enrolment record keeps), and that path exists only there. A node process restarted outside
it cannot open the records' paths, and serves nobody again until the next ADD: the DaemonSet
must mount the host's /var/run/netns (HostToContainer) for the same reason. The restart test
shows both.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import cri, netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import Node, Runtime
from support.nodemode import (
    LAYOUT_OLD,
    LAYOUT_V16,
    METADATA_IP,
    TOKEN_URL,
    FakeSts,
    KubeletPod,
    NodeProcess,
    fds_naming,
    kubelet_dir,
    netns_link,
    node_env,
    seconds_until_served,
    sockets_of,
    start_sts,
    token_claims,
)
from support.proxyproc import new_guid, shared_tempdir

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

_SKIP = cri.skip_reason() or ("" if CAN_NETNS else NETNS_SKIP_REASON)
NODE_PROXY = {"azwi-netproxy.io/node-proxy": "true"}
STS_ADDR = "198.18.1.2"  # outside podnet's 198.18.128.0/17
TRIPWIRE_TCP = (80, 8080, 443)


@dataclass(kw_only=True)
class CriPod(KubeletPod):
    """A pod containerd made: its kubelet identity, its sandbox, its `ip netns` name (`ns`)."""

    sandbox: cri.Pod


@dataclass
class CriNode:
    ctrd: cri.Containerd
    agent: Node
    sts: FakeSts
    process: NodeProcess
    pods_dir: Path
    args_record: Path

    def config(self, name: str, annotations: Mapping[str, str], *, namespace: str = "default",
               uid: str | None = None) -> Any:
        return self.ctrd.cri.sandbox_config(name, namespace=namespace, uid=uid, annotations=annotations,
                                            cgroup_parent=self.ctrd.cgroup_parent)

    def pod(self, stack: contextlib.ExitStack, name: str, annotations: Mapping[str, str], *,
            layout: str | None = LAYOUT_V16, ns_stack: contextlib.ExitStack | None = None) -> CriPod:
        """A pod made by RunPodSandbox (node mode asked for, plus `annotations`), its token
        projected beforehand as the kubelet mounts volumes before it makes the sandbox.

        `stack` removes the sandbox (StopPodSandbox, RemovePodSandbox); `ns_stack` (default
        `stack`) detaches the pod's `ip netns` name, which keeps its namespace alive: a
        test can look into it after RemovePodSandbox by closing `stack` first.
        """
        uid, namespace = str(uuid.uuid4()), f"team-{uuid.uuid4().hex[:6]}"
        identity = KubeletPod(ns="", uid=uid, namespace=namespace, name=name, service_account="workload",
                              issuer=f"https://oidc.prod-aks.azure.com/{new_guid()}/",
                              kubelet_dir=kubelet_dir(self.pods_dir, uid))
        if layout is not None:
            identity.project_token(layout)
        attached: list[str] = []
        (ns_stack or stack).callback(lambda: [cri.detach_netns(n) for n in attached])
        sandbox = stack.enter_context(self.ctrd.pod(name, annotations={**NODE_PROXY, **annotations},
                                                    namespace=namespace, uid=uid))
        attached.append(cri.attach_netns(sandbox, "azcrinode"))
        fields = {k: getattr(identity, k) for k in
                  ("uid", "namespace", "name", "service_account", "issuer", "kubelet_dir", "token")}
        return CriPod(ns=attached[0], sandbox=sandbox, **fields)

    def cni_args(self, sandbox_id: str, command: str = "ADD") -> list[dict[str, str]]:
        """CNI_ARGS of each call of `command` for the sandbox, as the recorder in the chain saw them."""
        return [dict(pair.split("=", 1) for pair in record["env"].get("CNI_ARGS", "").split(";") if pair)
                for record in cri.read_records(self.args_record)
                if record["command"] == command and record["env"].get("CNI_CONTAINERID") == sandbox_id]

    def records(self) -> list[str]:
        return sorted(p.name for p in (self.agent.run_dir / "node-pods").glob("*.json"))


@pytest.fixture(scope="module")
def cri_node() -> Iterator[CriNode]:
    """Name: cri_node. Scope: module. containerd with our agent chained, a fake Entra beside
    the node's namespace, the metadata address on the node's lo (where tripwires listen), a
    kubelet pods dir, and the node process running."""
    if _SKIP:
        pytest.skip(_SKIP)
    with contextlib.ExitStack() as stack:
        ctrd = stack.enter_context(cri.containerd())
        args_record = ctrd.record_file("cni-args")
        ctrd.set_conflist([cri.loopback(), ctrd.podnet(),
                           {"type": "azwi-test-recorder", "recordFile": str(args_record)}])
        agent = Node(base=ctrd.dir, bin_dir=ctrd.bin_dir, conf_dir=ctrd.conf_dir, run_dir=ctrd.dir / "azwi-run",
                     agent_log=ctrd.dir / "agent.log")
        agent.start_agent()
        stack.callback(lambda: print("--- the agent's log", agent.agent_log.read_text(errors="replace")[-3000:],
                                     sep="\n"))
        stack.callback(agent.stop_agent)
        ctrd.wait_chained()
        base = shared_tempdir("azwi-node-cri-")
        stack.callback(shutil.rmtree, base, True)
        sts_ns = stack.enter_context(netns.namespace("azncsts"))
        netns.connect(ctrd.node_netns, sts_ns, near_addr="198.18.1.1", far_addr=STS_ADDR)
        sts = start_sts(stack, base, sts_ns, STS_ADDR)
        # Where a pod's packets to the metadata address would land (its default route leads
        # into the node's namespace): the tripwires listen there.
        netns.add_address(ctrd.node_netns, "lo", METADATA_IP)
        pods_dir = base / "kubelet-pods"
        pods_dir.mkdir(mode=0o750)
        process = NodeProcess(base, ctrd.node_netns, node_env(sts, pods_dir=pods_dir, run_dir=agent.run_dir),
                              mount_ns_pid=ctrd.pid)
        stack.callback(lambda: print("--- the node process's log", process.log()[-4000:], sep="\n"))
        stack.callback(process.stop)
        process.start()
        yield CriNode(ctrd, agent, sts, process, pods_dir, args_record)


@dataclass
class TwoPods:
    node: CriNode
    a: CriPod
    b: CriPod
    c1: str
    c2: str


@pytest.fixture(scope="module")
def two_pods(cri_node: CriNode) -> Iterator[TwoPods]:
    """Name: two_pods. Scope: module. Pods A (default client C1, webhook v1.6 layout) and B
    (C2, the older layout), made by RunPodSandbox and removed at the end."""
    c1, c2 = new_guid(), new_guid()
    with contextlib.ExitStack() as stack:
        a = cri_node.pod(stack, "app-a", {"azwi-netproxy.io/client-id": c1})
        b = cri_node.pod(stack, "app-b", {"azwi-netproxy.io/client-id": c2}, layout=LAYOUT_OLD)
        cri_node.sts.add_app(c1, a)
        cri_node.sts.add_app(c2, b)
        yield TwoPods(cri_node, a, b, c1, c2)


def test_containerd_passes_the_pod_uid_and_each_pod_gets_the_token_of_its_own_account(two_pods: TwoPods) -> None:
    t = two_pods
    for pod in (t.a, t.b):
        # What containerd handed the chain: the UID of the sandbox config's metadata.
        [args] = t.node.cni_args(pod.sandbox.id)
        assert (args["K8S_POD_UID"], args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"]) == (
            pod.uid, pod.namespace, pod.name), args
    got_a, got_b = t.a.curl(), t.b.curl()
    assert got_a.status == 200, f"{got_a}\n{t.node.process.log()[-3000:]}"
    assert got_b.status == 200, got_b
    claims_a, claims_b = token_claims(got_a), token_claims(got_b)
    assert (claims_a["appid"], claims_a["sub"]) == (t.c1, t.a.subject), claims_a
    assert (claims_b["appid"], claims_b["sub"]) == (t.c2, t.b.subject), claims_b
    served = {e["pod"]: e["pod_uid"] for e in t.node.process.log_entries() if e.get("message") == "serving pod"}
    assert served == {t.a.full_name: t.a.uid, t.b.full_name: t.b.uid}, served
    print(f"\n--- two pods under containerd: A {t.a.full_name} (uid {t.a.uid}, netns {t.a.sandbox.netns_path})"
          f" got appid {claims_a['appid']} for {claims_a['sub']}; B {t.b.full_name} (uid {t.b.uid},"
          f" netns {t.b.sandbox.netns_path}) got appid {claims_b['appid']} for {claims_b['sub']}")


def test_b_asking_for_as_client_gets_entras_refusal_never_as_cached_token(two_pods: TwoPods) -> None:
    t = two_pods
    assert t.a.curl().status == 200  # A's token for C1 is cached now
    before = len(t.node.sts.exchanges())
    got = t.b.curl(TOKEN_URL + f"&client_id={t.c1}")
    assert got.status == 400, got
    assert "AADSTS70021" in got.json()["error_description"], got
    (exchange,) = t.node.sts.exchanges()[before:]
    assert exchange["client_id"] == t.c1 and exchange.get("error_code") == 70021
    assert exchange["form"]["client_assertion"] == t.b.token.read()  # type: ignore[union-attr]
    assert t.b.curl(TOKEN_URL + f"&client_id={t.c1}").status == 400
    print(f"\n--- B asking for C1: HTTP {got.status} {got.json()['error_description'][:90]!r}")


def test_a_rotated_token_file_is_used_at_the_next_exchange(two_pods: TwoPods) -> None:
    t = two_pods
    assert t.a.token is not None
    new_assertion = t.a.new_sa_token()
    t.a.token.rotate(new_assertion)
    resource = f"https://rotated-{new_guid()}.example.com/"
    got = t.a.curl(TOKEN_URL.replace("https://management.azure.com/", resource))
    assert got.status == 200, got
    exchange = t.node.sts.exchanges()[-1]
    assert exchange["form"]["client_assertion"] == new_assertion
    assert exchange["client_id"] == t.c1


def test_no_door_and_refused_with_the_node_process_stopped(two_pods: TwoPods) -> None:
    """uid 1000, 1501 and root in a containerd pod get the node process's answer, and with
    it stopped are refused; tripwires on the metadata address in the node's namespace never
    see a packet. Started again, it serves both pods again without a new ADD."""
    t = two_pods
    with netns.processes() as procs:
        tripwires = [netns.start_responder(procs, t.node.ctrd.node_netns, METADATA_IP, port, f"imds-{port}")
                     for port in TRIPWIRE_TCP]
        try:
            for uid in (1000, 1501, None):
                got = t.a.curl(uid=uid)
                assert got.status == 200 and token_claims(got)["appid"] == t.c1, (uid, got)
                for port in TRIPWIRE_TCP[1:]:
                    assert netns.probe(t.a.ns, METADATA_IP, port, uid=uid) == "refused", (uid, port)
            assert t.node.process.stop() == 0
            for pod in (t.a, t.b):
                for uid in (1000, 1501, None):
                    down = pod.curl(uid=uid, max_time_s=5)
                    assert (down.exit_code, down.status) == (7, 0), (pod.name, uid, down)
        finally:
            if t.node.process.proc is None:
                t.node.process.start()
            hit = {responder.args[-1]: netns.hits(procs, responder) for responder in tripwires}
        assert all(sources == [] for sources in hit.values()), hit
    assert t.a.curl().status == t.b.curl().status == 200  # replayed from the records


def test_remove_pod_sandbox_releases_the_pod(cri_node: CriNode) -> None:
    """StopPodSandbox + RemovePodSandbox: DEL through the chain, the listener closed, the
    record gone, and the node process holds no socket or descriptor of the namespace."""
    client = new_guid()
    with contextlib.ExitStack() as keep_ns:
        with contextlib.ExitStack() as stack:
            pod = cri_node.pod(stack, "gone", {"azwi-netproxy.io/client-id": client}, ns_stack=keep_ns)
            cri_node.sts.add_app(client, pod)
            assert pod.curl().status == 200
            pid = cri_node.process.proc.pid  # type: ignore[union-attr]
            held = sockets_of(pod.ns, pid)
            assert any("LISTEN" in line and "127.0.0.1:8000" in line for line in held), held
            assert f"{pod.sandbox.id}.json" in cri_node.records()
            link = netns_link(pod.ns)
        # RemovePodSandbox is done; the namespace lives on through our `ip netns` name only.
        assert cri_node.cni_args(pod.sandbox.id, "DEL"), "containerd never called DEL"
        assert sockets_of(pod.ns, pid) == []
        assert fds_naming(pid, link) == 0
        assert f"{pod.sandbox.id}.json" not in cri_node.records()
        stopped = [e for e in cri_node.process.log_entries()
                   if e.get("message") == "stopped serving pod" and e.get("pod") == pod.full_name]
        assert [e["reason"] for e in stopped] == ["DEL"], stopped


def test_a_restarted_node_process_serves_live_pods_again_and_not_removed_ones(cri_node: CriNode) -> None:
    """A crash (SIGKILL) with two pods live; B removed by CRI meanwhile. A node process
    started outside containerd's mount namespace cannot open A's recorded namespace path
    and serves nobody (refused, never answered by anything else); one started where the
    runtime's paths are serves A again within 5 s without a new ADD, and never B."""
    c1, c2 = new_guid(), new_guid()
    process = cri_node.process
    try:
        with contextlib.ExitStack() as keep_ns, contextlib.ExitStack() as a_stack:
            a = cri_node.pod(a_stack, "live", {"azwi-netproxy.io/client-id": c1}, ns_stack=keep_ns)
            with contextlib.ExitStack() as b_stack:
                b = cri_node.pod(b_stack, "removed", {"azwi-netproxy.io/client-id": c2}, ns_stack=keep_ns)
                cri_node.sts.add_app(c1, a)
                cri_node.sts.add_app(c2, b)
                assert a.curl().status == b.curl().status == 200
                process.stop(kill=True)
                assert (a.curl(max_time_s=5).exit_code, b.curl(max_time_s=5).exit_code) == (7, 7)
            # B's sandbox is removed while no node process runs: its record goes with its DEL.
            assert f"{b.sandbox.id}.json" not in cri_node.records()
            assert f"{a.sandbox.id}.json" in cri_node.records()

            # The same node process, in the host's mount namespace (its log apart).
            outside_base = process.base / f"outside-{uuid.uuid4().hex[:6]}"
            outside_base.mkdir()
            outside = NodeProcess(outside_base, process.ns, process.env)
            outside.start()
            try:
                assert a.curl(max_time_s=5).exit_code == 7
                gone = [e for e in outside.log_entries()
                        if e.get("message") == "not serving a pod again: its network namespace is gone"]
                assert a.sandbox.netns_path in [e["netns"] for e in gone], gone
                [up] = [e for e in outside.log_entries() if e.get("message") == "node process started"]
                assert up["pods"] == 0, up  # every record's path is missing here, not only A's
            finally:
                assert outside.stop() == 0

            started = time.monotonic()
            proc = process.start()
            served_after_s = seconds_until_served(a, started)
            assert served_after_s is not None and served_after_s < 5, process.log()[-3000:]
            assert b.curl(max_time_s=5).exit_code == 7
            assert sockets_of(b.ns, proc.pid) == []
            assert len(cri_node.cni_args(a.sandbox.id)) == 1  # no new ADD
            print(f"\n--- restart under containerd: A served again {served_after_s:.2f} s after the node "
                  f"process was started (no new ADD); B, removed while it was down, refused")
    finally:
        if process.proc is None:
            process.start()


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"azwi-netproxy.io/client-id": "not-a-guid"}, "azwi-netproxy.io/client-id"),
        ({"azwi-netproxy.io/identity-map": "identities: []"}, "azwi-netproxy.io/identity-map"),
        ({"azwi-netproxy.io/node-proxy": "yes"}, "azwi-netproxy.io/node-proxy"),
    ],
    ids=["client-id", "identity-map", "node-proxy-value"],
)
def test_a_bad_node_mode_annotation_fails_run_pod_sandbox_with_the_code_7_message(
        cri_node: CriNode, annotations: dict[str, str], named: str) -> None:
    ctrd = cri_node.ctrd
    asked = {**NODE_PROXY, **annotations}
    # What the plugin answers a runtime for these annotations (the spec's error JSON), asked
    # directly through the node's shim for a namespace of our own.
    with netns.namespace("azncbad") as scratch:
        conflist = json.loads(next(ctrd.conf_dir.glob("*.conflist")).read_text())
        ours = conflist["plugins"][-1]
        runtime = Runtime([ctrd.bin_dir], container_id=uuid.uuid4().hex, netns=f"/run/netns/{scratch}",
                          annotations=asked, args={"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "bad",
                                                   "K8S_POD_UID": str(uuid.uuid4())})
        direct = runtime.call("ADD", ours["type"], runtime.plugin_config(
            conflist, ours, {"cniVersion": conflist["cniVersion"], "interfaces": [], "ips": []}))
    body = json.loads(direct.stdout)
    assert direct.returncode != 0 and body["code"] == 7 and named in body["msg"] + body.get("details", ""), direct

    before = {item.id for item in ctrd.cri.list_pod_sandbox()}
    pods_before = len(cri_node.records())
    with pytest.raises(grpc.RpcError) as refused:
        ctrd.run_sandbox(cri_node.config("bad", asked, uid=str(uuid.uuid4())))
    details = str(refused.value.details())
    assert body["msg"] in details and named in details, details
    print(f"\n--- RunPodSandbox with {annotations}: {refused.value.code()} {details[-220:]!r}")
    assert len(cri_node.records()) == pods_before
    for sandbox_id in {item.id for item in ctrd.cri.list_pod_sandbox()} - before:
        assert [s.state for s in ctrd.cri.list_pod_sandbox() if s.id == sandbox_id] != [0]
        ctrd.remove_sandbox(sandbox_id)
