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
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from support import cri, netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import Node
from support.fake_entra import FakeEntraClient, decode_fake_token, issue_server_cert
from support.fake_imds import FakeImdsClient
from support.pod import in_netns
from support.proxyproc import (
    ProjectedToken,
    base_env,
    http_request,
    make_sa_token,
    new_guid,
    shared_tempdir,
    start_script,
    stop_process,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

_SKIP = cri.skip_reason() or ("" if CAN_NETNS else NETNS_SKIP_REASON)
SUPPORT = Path(__file__).resolve().parent / "support"
REDIRECT = {"azwi-netproxy.io/redirect": "true"}
METADATA_IP = "169.254.169.254"
TOKEN_URL = (f"http://{METADATA_IP}/metadata/identity/oauth2/token"
             "?api-version=2018-02-01&resource=https://management.azure.com/")


def _loaded_plugins(ctrd: cri.Containerd) -> list[list[str]]:
    info = json.loads(dict(ctrd.cri.status(verbose=True).info)["cniconfig"])
    return [[p["Network"]["type"] for p in net["Config"]["Plugins"]] for net in info["Networks"]]


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
            deadline = time.monotonic() + 20
            while _loaded_plugins(ctrd)[-1][-1] != "azwi-netproxy":
                assert time.monotonic() < deadline, f"CRI never loaded the chained conflist: {_loaded_plugins(ctrd)}"
                time.sleep(0.1)
            yield ctrd, node
        finally:
            node.stop_agent()
            print("--- the agent's log", node.agent_log.read_text(errors="replace")[-4000:], sep="\n")


def _attach(pod: cri.Pod) -> str:
    """An `ip netns` name for the pod's namespace, so the netns helpers can reach it."""
    name = f"azcripod-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "attach", name, str(pod.pid)], check=True, capture_output=True)
    return name


def _detach(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def _rules(ns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "azwi_proxy"],
                          capture_output=True, text=True, check=False)


def test_containerd_chains_our_plugin_with_the_annotations_capability(
    ctrd_node: tuple[cri.Containerd, Node],
) -> None:
    ctrd, _node = ctrd_node
    assert _loaded_plugins(ctrd)[-1] == ["loopback", "azwi-test-podnet", "azwi-netproxy"]
    info = json.loads(dict(ctrd.cri.status(verbose=True).info)["cniconfig"])
    ours = info["Networks"][-1]["Config"]["Plugins"][-1]["Network"]
    assert ours["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}


def test_a_pod_that_asks_gets_the_rules_before_it_runs_and_others_do_not(
    ctrd_node: tuple[cri.Containerd, Node],
) -> None:
    ctrd, _node = ctrd_node
    with ctrd.pod("plain") as plain:
        name = _attach(plain)
        try:
            assert _rules(name).returncode != 0, "a pod that did not ask got our table"
        finally:
            _detach(name)
    offset = ctrd.log_size()
    with ctrd.pod("asks", annotations={**REDIRECT, "azwi-netproxy.io/proxy-port": "8123"}) as asks:
        name = _attach(asks)
        try:
            listed = _rules(name)
            assert listed.returncode == 0, listed.stderr
            assert "8123" in listed.stdout, listed.stdout
        finally:
            _detach(name)
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
    stopped, nothing of the app's reaches the node's (fake) IMDS."""
    ctrd, _node = ctrd_node
    work = shared_tempdir("azwi-cri-pod-")
    node_ns = ctrd.node_netns
    procs: list[Any] = []
    with ctrd.pod("app", annotations=REDIRECT) as pod:
        name = _attach(pod)
        try:
            gateway = subprocess.run(["ip", "-n", name, "-j", "route", "show", "default"], check=True,
                                     capture_output=True, text=True).stdout
            node_addr = json.loads(gateway)[0]["gateway"]
            # The node's IMDS, played by the fake, on the node side (our namespace).
            subprocess.run(["ip", "-n", node_ns, "addr", "add", f"{METADATA_IP}/32", "dev", "lo"], check=True)
            imds = start_script(netns.ns_argv(node_ns, [sys.executable, str(SUPPORT / "fake_imds.py"),
                                                        "--bind", f"{METADATA_IP}:80"]), work / "imds.log")
            procs.append(imds.proc)
            ca = trustme.CA()
            ca_file = work / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
            ca_file.chmod(0o644)
            issue_server_cert(ca, work / "entra-cert", node_addr)
            entra = start_script(netns.ns_argv(node_ns, [sys.executable, str(SUPPORT / "fake_entra.py"),
                                                         "--bind", f"{node_addr}:443",
                                                         "--cert-dir", str(work / "entra-cert")]),
                                 work / "entra.log")
            procs.append(entra.proc)
            tenant, client = new_guid(), new_guid()
            issuer = f"https://oidc.prod-aks.azure.com/{new_guid()}/"
            sa_dir = work / "sa"
            sa_dir.mkdir(mode=0o755)
            token = ProjectedToken(sa_dir, make_sa_token("team", "app", issuer=issuer))
            entra_client = FakeEntraClient(f"https://{node_addr}:443", str(ca_file))
            in_netns(node_ns, lambda: entra_client.add_app(tenant, client,
                                                           ["system:serviceaccount:team:app"], issuer))
            env = {**base_env(package_pythonpath), "AZURE_TENANT_ID": tenant, "AZURE_CLIENT_ID": client,
                   "AZURE_FEDERATED_TOKEN_FILE": str(token.path),
                   "AZURE_AUTHORITY_HOST": f"https://{node_addr}/", "SSL_CERT_FILE": str(ca_file)}
            log = (work / "proxy.log").open("wb")
            proxy = subprocess.Popen(netns.ns_argv(name, [python_for_other_uids, "-m", "azwi_netproxy",
                                                          "--proxy-port=8000"], uid=1501),
                                     env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            procs.append(proxy)
            deadline = time.monotonic() + 15
            while True:
                try:
                    if in_netns(name, lambda: http_request(8000, "/readyz", timeout_s=1).status) == 200:
                        break
                except OSError:
                    pass
                assert proxy.poll() is None and time.monotonic() < deadline, (work / "proxy.log").read_text()
                time.sleep(0.05)

            def curl() -> tuple[int, str]:
                done = netns.run_in(name, ["curl", "-sS", "--max-time", "5", "-H", "Metadata: true",
                                           "-w", "\n%{http_code}", TOKEN_URL], uid=1000, timeout=20,
                                    env={"PATH": "/usr/bin:/bin"})
                body, _, code = done.stdout.rpartition("\n")
                return int(code or 0), body

            status, body = curl()
            assert status == 200, body
            minted = decode_fake_token(json.loads(body)["access_token"])["n"]
            exchanges = in_netns(node_ns, entra_client.exchanges)
            assert [e["client_id"] for e in exchanges if e.get("token_n") == minted] == [client]
            print("--- app (uid 1000) in the containerd pod got a token:", body[:160], sep="\n")
            imds_client = FakeImdsClient(f"http://{METADATA_IP}:80")
            seen = len(in_netns(node_ns, imds_client.records))
            stop_process(proxy)
            status, body = curl()
            assert status == 0, f"with the proxy stopped the app got HTTP {status}: {body}"
            assert len(in_netns(node_ns, imds_client.records)) == seen, "the app reached the node's IMDS"
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            subprocess.run(["ip", "-n", node_ns, "addr", "del", f"{METADATA_IP}/32", "dev", "lo"],
                           check=False, capture_output=True)
            _detach(name)
            subprocess.run(["rm", "-rf", str(work)], check=False)
