"""The CNI plugin under a real runtime: containerd's CRI creates pods and calls our chain.

Name: test_cni_containerd
Scope: module (one private containerd, support.cri, with the node agent of support.cni_node
    chaining our plugin into its conflist of the reference loopback and the podnet stand-in
    for the cluster's network plugin), function (each test's pods).
Depends: everything support.cri needs (containerd 1.6, runc, containernetworking-plugins,
    grpcio), root + netns + nft; support.fake_entra and support.fake_imds for the token run.

Nothing calls the plugin but containerd: RunPodSandbox through CRI, as the kubelet does, with
the pod's annotations; containerd reads the conflist the agent chained, passes the
annotations because our entry declares the capability, and runs the shim from its bin dir.
The rules are judged by the kernel (nft's own listing) and by where clients' traffic lands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import trustme
from support import cri, netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import Node
from support.fake_entra import issue_server_cert
from support.netns import METADATA_IP, Topology
from support.pod import TOKEN_URL, Identity, PodSandbox, in_netns
from support.proxyproc import ProjectedToken, make_sa_token, new_guid, shared_tempdir, stop_process

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

_SKIP = cri.skip_reason() or ("" if CAN_NETNS else NETNS_SKIP_REASON)
SUPPORT = Path(__file__).resolve().parent / "support"
REDIRECT = {"azwi-netproxy.io/redirect": "true"}
NETNS_PREFIX = "azcripod"


@pytest.fixture(scope="module")
def ctrd_node() -> Iterator[tuple[cri.Containerd, Node]]:
    """Name: ctrd_node. Scope: module. containerd with our agent installed on its "node"."""
    if _SKIP:
        pytest.skip(_SKIP)
    with cri.containerd() as ctrd:
        ctrd.set_conflist([cri.loopback(), ctrd.podnet()])
        run_dir = ctrd.dir / "azwi-run"
        node = Node(base=ctrd.dir, bin_dir=ctrd.bin_dir, conf_dir=ctrd.conf_dir, run_dir=run_dir,
                    agent_log=ctrd.dir / "agent.log")
        node.start_agent()
        try:
            ctrd.wait_chained()
            yield ctrd, node
        finally:
            node.stop_agent()
            print("--- the agent's log", node.agent_log.read_text(errors="replace")[-4000:], sep="\n")


def _rules(ns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "azwi_proxy"],
                          capture_output=True, text=True, check=False)


def test_containerd_chains_our_plugin_with_the_annotations_capability(
    ctrd_node: tuple[cri.Containerd, Node],
) -> None:
    ctrd, _node = ctrd_node
    assert ctrd.loaded_plugins()[-1] == ["loopback", "azwi-test-podnet", "azwi-netproxy"]
    info = json.loads(dict(ctrd.cri.status(verbose=True).info)["cniconfig"])
    ours = info["Networks"][-1]["Config"]["Plugins"][-1]["Network"]
    assert ours["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}


def test_a_pod_that_asks_gets_the_rules_before_it_runs_and_others_do_not(
    ctrd_node: tuple[cri.Containerd, Node],
) -> None:
    ctrd, _node = ctrd_node
    with ctrd.pod("plain") as plain:
        name = cri.attach_netns(plain, NETNS_PREFIX)
        try:
            assert _rules(name).returncode != 0, "a pod that did not ask got our table"
        finally:
            cri.detach_netns(name)
    offset = ctrd.log_size()
    with ctrd.pod("asks", annotations={**REDIRECT, "azwi-netproxy.io/proxy-port": "8123"}) as asks:
        name = cri.attach_netns(asks, NETNS_PREFIX)
        try:
            listed = _rules(name)
            assert listed.returncode == 0, listed.stderr
            assert "8123" in listed.stdout, listed.stdout
        finally:
            cri.detach_netns(name)
    # The plugin's JSON log lines end up in the runtime's log, naming the pod.
    lines = [json.loads(line) for line in ctrd.log_since(offset).splitlines() if line.startswith("{")]
    installed = [line for line in lines if line.get("message") == "redirect installed"]
    assert [(line["logger"], line["pod"], line["proxy_port"]) for line in installed] == [
        ("cni", "default/asks", 8123)], lines


def test_a_bad_annotation_or_a_missing_agent_fails_only_the_sandbox_that_asks(ctrd_node: tuple[cri.Containerd, Node]) -> None:
    ctrd, node = ctrd_node
    before = {item.id for item in ctrd.cri.list_pod_sandbox()}
    bad = ctrd.cri.sandbox_config("bad", annotations={"azwi-netproxy.io/redirect": "yes"},
                                  cgroup_parent=ctrd.cgroup_parent)
    with pytest.raises(grpc.RpcError) as refused:
        ctrd.run_sandbox(bad)
    assert "azwi-netproxy.io/redirect" in str(refused.value.details()), refused.value.details()
    assert node.stop_agent() == 0
    try:
        asks = ctrd.cri.sandbox_config("asks", annotations=REDIRECT, cgroup_parent=ctrd.cgroup_parent)
        with pytest.raises(grpc.RpcError) as waiting:
            ctrd.run_sandbox(asks)
        assert "agent is not running" in str(waiting.value.details()), waiting.value.details()
        # Pods that did not ask start all the same: the shim hands containerd's result on.
        for annotations in ({}, {"azwi-netproxy.io/redirect": "false"}):
            with ctrd.pod("others", annotations=annotations) as other:
                assert other.ip, "the sandbox has no IP: the chain's result was lost"
    finally:
        node.start_agent()
    # containerd tore the failed sandboxes down (after DEL through the whole chain).
    left = {item.id for item in ctrd.cri.list_pod_sandbox()} - before
    for sandbox_id in left:
        state = [s.state for s in ctrd.cri.list_pod_sandbox() if s.id == sandbox_id]
        assert state != [0], f"a failed sandbox is READY: {sandbox_id}"
        ctrd.remove_sandbox(sandbox_id)


def test_a_whole_pod_run_through_the_plugin(ctrd_node: tuple[cri.Containerd, Node],
                                            python_for_other_uids: str, package_pythonpath: str) -> None:
    """containerd creates the pod, our ADD installs the rules, the proxy runs as uid 1501
    and an app as uid 1000 gets a token from a fake Entra on the node side; with the proxy
    stopped, nothing of the app's reaches the node's (fake) IMDS. The pod's handles are
    support.pod's, over the containerd pod's namespace and the harness's node namespace."""
    ctrd, _node = ctrd_node
    node_ns = ctrd.node_netns
    with ExitStack() as stack, ctrd.pod("app", annotations=REDIRECT) as pod:
        name = cri.attach_netns(pod, NETNS_PREFIX)
        stack.callback(cri.detach_netns, name)
        work = shared_tempdir("azwi-cri-pod-")
        stack.callback(shutil.rmtree, work, True)
        (work / "logs").mkdir()
        routes = subprocess.run(["ip", "-n", name, "-j", "route", "show", "default"], check=True,
                                capture_output=True, text=True).stdout
        node_addr = json.loads(routes)[0]["gateway"]
        # The node's IMDS, played by the fake, on the node side (the harness's namespace).
        subprocess.run(["ip", "-n", node_ns, "addr", "add", f"{METADATA_IP}/32", "dev", "lo"], check=True)
        stack.callback(subprocess.run, ["ip", "-n", node_ns, "addr", "del", f"{METADATA_IP}/32", "dev", "lo"],
                       check=False, capture_output=True)
        imds = netns.start_fake_in(node_ns, "fake_imds.py", f"{METADATA_IP}:80", work / "logs" / "imds.log")
        stack.callback(stop_process, imds.proc)
        ca = trustme.CA()
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca_file.chmod(0o644)
        issue_server_cert(ca, work / "entra-cert", node_addr)
        entra = netns.start_fake_in(node_ns, "fake_entra.py", f"{node_addr}:443", work / "logs" / "entra.log",
                                    "--cert-dir", str(work / "entra-cert"))
        stack.callback(stop_process, entra.proc)
        sa_dir = work / "sa"
        sa_dir.mkdir(mode=0o755)
        issuer = f"https://oidc.prod-aks.azure.com/{new_guid()}/"
        identity = Identity(new_guid(), new_guid(), "system:serviceaccount:team:app", issuer,
                            ProjectedToken(sa_dir, make_sa_token("team", "app", issuer=issuer)))
        topo = Topology(pod=name, imds=node_ns, sts=node_ns, peer=None, metadata_ip=METADATA_IP,
                        sts_addr=node_addr)
        sandbox = PodSandbox(topo=topo, backend="nftables", python=python_for_other_uids,
                             pythonpath=package_pythonpath, work=work, identity=identity,
                             entra_process=entra, imds_process=imds, ca_file=str(ca_file))
        stack.callback(sandbox.close)
        in_netns(node_ns, lambda: sandbox.entra().add_app(identity.tenant_id, identity.client_id,
                                                          [identity.subject], issuer))
        sandbox.start_proxy()

        got = sandbox.curl(TOKEN_URL)
        assert got.status == 200, str(got)
        assert sandbox.exchange_of(got.json()["access_token"])["client_id"] == identity.client_id
        print("--- app (uid 1000) in the containerd pod got a token:", got.body[:160], sep="\n")
        seen = len(sandbox.imds_records())
        sandbox.stop_proxy()
        got = sandbox.curl(TOKEN_URL, max_time_s=5)
        assert got.status == 0, f"with the proxy stopped the app got {got}"
        assert len(sandbox.imds_records()) == seen, "the app reached the node's IMDS"
