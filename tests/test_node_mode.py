"""Node mode on one node: the node process serves several pods through listeners in their own
namespaces, with the plugin driven as a runtime drives it.

Name: test_node_mode
Scope: module (`two_pods`: one node, pods A and B enrolled, the node process running),
    function (tests that need a node of their own).
Depends: root + netns + nft (the `root` marker), support.nodemode (the real agent and its
    shim, the node process as root in its own namespace, a fake Entra over HTTPS, kubelet-style
    pod dirs), the reference CNI plugins.

The fake Entra federates client C1 only with pod A's service account and C2 only with pod
B's, so which token a pod gets is Entra's judgement of the assertion the node process sent
for it, not the product's. Where traffic lands is judged by tripwire listeners on the
metadata address and by curl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import REFERENCE_PLUGINS
from support.fake_imds import FakeImdsClient
from support.nodemode import (
    INSTANCE_URL,
    LAYOUT_OLD,
    METADATA_IP,
    TOKEN_URL,
    NodeMode,
    NodePod,
    Opened,
    anonymous_kb,
    fds_naming,
    netns_link,
    node_mode,
    seconds_until_served,
    sockets_of,
    token_claims,
    tree,
)
from support.pod import in_netns
from support.proxyproc import http_request, new_guid, shared_tempdir, stop_process

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CAN_NETNS, reason=NETNS_SKIP_REASON),
    pytest.mark.skipif(not (REFERENCE_PLUGINS / "loopback").exists(),
                       reason="the reference CNI plugins are missing (apt-get install containernetworking-plugins)"),
]

ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


@dataclass
class TwoPods:
    mode: NodeMode
    a: NodePod
    b: NodePod
    c1: str
    c2: str


@pytest.fixture(scope="module")
def two_pods(python_for_other_uids: str) -> Iterator[TwoPods]:
    """Name: two_pods. Scope: module. Pods A (client C1, webhook v1.6 layout) and B (client
    C2, the older layout) on one node, both enrolled by ADD, the node process running."""
    with node_mode() as mode:
        a, b = mode.new_pod(), mode.new_pod()
        a.project_token()
        b.project_token(LAYOUT_OLD)
        c1, c2 = new_guid(), new_guid()
        mode.add_app(c1, a)
        mode.add_app(c2, b)
        mode.start_node()
        for pod, client in ((a, c1), (b, c2)):
            outcome = mode.add(pod, {"azwi-netproxy.io/client-id": client})
            assert outcome.returncode == 0, f"ADD failed:\n{outcome}\n{mode.node_log()[-3000:]}"
        yield TwoPods(mode, a, b, c1, c2)


@dataclass
class Answer:
    status: int
    headers: str
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def curl_headers(pod: NodePod, url: str = TOKEN_URL) -> Answer:
    """curl -i as uid 1000 in the pod: the status line, the headers and the body."""
    done = netns.run_in(pod.ns, ["curl", "-sS", "-i", "--max-time", "10", "-H", "Metadata: true", url],
                        uid=1000, env={"PATH": "/usr/bin:/bin"}, timeout=20)
    # Text mode reads CRLF as LF.
    head, _, body = done.stdout.partition("\n\n")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    return Answer(status, head, body)


def test_each_pod_gets_the_token_of_its_own_service_account(two_pods: TwoPods) -> None:
    t = two_pods
    got_a, got_b = t.a.curl(), t.b.curl()
    assert got_a.status == 200, f"{got_a}\n{t.mode.node_log()[-3000:]}"
    assert got_b.status == 200, got_b
    # Entra minted each token for the assertion it was shown: A's for C1, B's for C2.
    claims_a, claims_b = token_claims(got_a), token_claims(got_b)
    assert (claims_a["appid"], claims_a["sub"]) == (t.c1, t.a.subject), claims_a
    assert (claims_b["appid"], claims_b["sub"]) == (t.c2, t.b.subject), claims_b
    # The answers are the sidecar's: IMDS's eight string fields.
    doc = json.loads(got_a.body)
    assert set(doc) == {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
                        "not_before", "resource", "token_type"}
    assert all(isinstance(v, str) for v in doc.values()) and doc["client_id"] == t.c1


def test_a_pod_never_gets_another_pods_cached_token(two_pods: TwoPods) -> None:
    t = two_pods
    assert t.a.curl().status == 200  # A's token for C1 is cached now
    before = len(t.mode.exchanges())
    got = t.b.curl(TOKEN_URL + f"&client_id={t.c1}")
    # Entra refuses B's assertion for C1 (no federated credential): IMDS's 400, with the AADSTS code.
    assert got.status == 400, got
    assert "AADSTS70021" in got.json()["error_description"], got
    (exchange,) = t.mode.exchanges()[before:]
    assert exchange["client_id"] == t.c1 and exchange.get("error_code") == 70021
    # And asked again, B still gets no token: a refusal is never papered over with A's.
    assert t.b.curl(TOKEN_URL + f"&client_id={t.c1}").status == 400


def test_a_rotated_token_file_is_used_at_the_next_exchange(two_pods: TwoPods) -> None:
    t = two_pods
    assert t.a.token is not None
    new_assertion = t.a.new_sa_token()
    t.a.token.rotate(new_assertion)
    resource = f"https://rotated-{new_guid()}.example.com/"
    got = t.a.curl(TOKEN_URL.replace("https://management.azure.com/", resource))
    assert got.status == 200, got
    exchange = t.mode.exchanges()[-1]
    assert exchange["form"]["client_assertion"] == new_assertion
    assert exchange["form"]["scope"] == resource + "/.default"  # as upstream builds it


def test_log_lines_name_the_pod(two_pods: TwoPods) -> None:
    t = two_pods
    assert t.b.curl().status == 200
    time.sleep(0.2)  # access lines are written in batches, at most 50 ms late
    access = [e for e in t.mode.node_log_entries() if e.get("caller") == "server.py:access"]
    assert access and {e.get("pod") for e in access} <= {t.a.full_name, t.b.full_name}, access[-3:]
    assert any(e.get("pod") == t.b.full_name and e["status"] == 200 for e in access)


# ---- no door in the pod ----------------------------------------------------------------------

TRIPWIRE_TCP = (80, 8080, 443, 8000)


def test_nothing_in_a_node_mode_pod_reaches_the_metadata_address(two_pods: TwoPods) -> None:
    """uid 1000, 1501 (what the sidecar's exemption would let through) and root, and root
    switching to 1501 with setpriv: each gets the node process's answer, and a tripwire on the
    metadata address, on any port, never sees a packet; with the node process down, refused."""
    t = two_pods
    with netns.processes() as procs:
        tripwires = [netns.start_responder(procs, t.mode.imds_ns, METADATA_IP, port, f"imds-{port}")
                     for port in TRIPWIRE_TCP]
        tripwires.append(netns.start_responder(procs, t.mode.imds_ns, METADATA_IP, 53, "imds-udp",
                                               proto="udp"))
        try:
            for uid in (1000, 1501, 0, None):  # None: root as the runtime starts it
                got = t.a.curl(uid=uid)
                assert got.status == 200 and token_claims(got)["appid"] == t.c1, (uid, got)
                # Pass-through is off in node mode: other paths are refused, never forwarded.
                other = t.a.curl(INSTANCE_URL, uid=uid)
                assert other.status == 403 and other.json()["error"] == "forbidden", (uid, other)
                for port in TRIPWIRE_TCP[1:]:
                    assert netns.probe(t.a.ns, METADATA_IP, port, uid=uid) == "refused", (uid, port)
                assert netns.probe(t.a.ns, METADATA_IP, 53, uid=uid, proto="udp") == "error:EPERM"
            t.mode.stop_node()
            for uid in (1000, 1501, None):
                down = t.a.curl(uid=uid, max_time_s=5)
                assert (down.exit_code, down.status) == (7, 0), (uid, down)  # 7: connection refused
            assert netns.probe(t.a.ns, METADATA_IP, 80, uid=1501) == "refused"
        finally:
            if t.mode.node_proc is None:
                t.mode.start_node()
            hit = {responder.args[-1]: netns.hits(procs, responder) for responder in tripwires}
        assert all(sources == [] for sources in hit.values()), hit
    assert t.a.curl().status == 200  # served again by the restarted node process


# ---- lifecycle -------------------------------------------------------------------------------


def test_a_restarted_node_process_serves_live_pods_again_and_not_deleted_ones() -> None:
    with node_mode() as mode:
        a, b = mode.new_pod(), mode.new_pod()
        c1, c2 = new_guid(), new_guid()
        for pod, client in ((a, c1), (b, c2)):
            pod.project_token()
            mode.add_app(client, pod)
        mode.start_node()
        for pod, client in ((a, c1), (b, c2)):
            assert mode.add(pod, {"azwi-netproxy.io/client-id": client}).returncode == 0
            assert pod.curl().status == 200
        mode.stop_node(kill=True)  # a crash: no goodbye, every listener closed by the kernel
        assert (a.curl(max_time_s=5).exit_code, b.curl(max_time_s=5).exit_code) == (7, 7)
        # B is deleted while no node process runs: DEL succeeds, and B's namespace lingers.
        assert mode.delete(b).returncode == 0
        started = time.monotonic()
        proc = mode.start_node()
        served_after_s = seconds_until_served(a, started)
        assert served_after_s is not None and served_after_s < 5, mode.node_log()[-3000:]
        assert b.curl(max_time_s=5).exit_code == 7  # not served: its sandbox was deleted
        assert sockets_of(b.ns, proc.pid) == []
        # No new ADD was needed: the plugin ran once per pod.
        replayed = [e for e in mode.node_log_entries() if e.get("message") == "serving pod"]
        assert [e["pod"] for e in replayed] == [a.full_name, b.full_name, a.full_name], replayed


def test_del_closes_the_listener_and_its_connections_and_releases_the_namespace() -> None:
    with node_mode() as mode, netns.processes() as procs:
        pod = mode.new_pod()
        pod.project_token()
        client = new_guid()
        mode.add_app(client, pod)
        proc = mode.start_node()
        assert mode.add(pod, {"azwi-netproxy.io/client-id": client}).returncode == 0
        assert pod.curl().status == 200
        # A client that keeps its connection open (a keep-alive pool, say).
        holder = procs.start(pod.ns, [netns.SYSTEM_PYTHON, "-c", _HOLD, METADATA_IP], ready_line="connected")
        listening = sockets_of(pod.ns, proc.pid)
        assert any("LISTEN" in line and "127.0.0.1:8000" in line for line in listening), listening
        assert any("ESTAB" in line for line in listening), listening
        link = netns_link(pod.ns)
        assert mode.delete(pod).returncode == 0
        out, _ = holder.communicate(timeout=10)
        assert "closed" in out, out  # the held connection was dropped at DEL
        assert sockets_of(pod.ns, proc.pid) == []
        assert fds_naming(proc.pid, link) == 0
        assert pod.curl(max_time_s=5).exit_code == 7


# Connects through the redirect, then waits until the server side goes away.
_HOLD = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], 80), timeout=5)
print("connected", flush=True)
sock.settimeout(20)
try:
    data = sock.recv(1)
except OSError:
    data = b""
print("closed" if data == b"" else "data", flush=True)
"""


def test_add_and_del_200_times_leave_descriptors_and_memory_flat() -> None:
    with node_mode() as mode:
        pod = mode.new_pod()
        pod.project_token()
        proc = mode.start_node()

        def cycle() -> None:
            pod.runtime.container_id = uuid.uuid4().hex
            added = mode.add(pod)
            assert added.returncode == 0, added
            assert mode.delete(pod).returncode == 0

        for _ in range(20):
            cycle()
        fds, anonymous = len(os.listdir(f"/proc/{proc.pid}/fd")), anonymous_kb(proc.pid)
        for _ in range(200):
            cycle()
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) == fds
        grown_kb = anonymous_kb(proc.pid) - anonymous
        assert grown_kb < 1024, f"anonymous memory grew by {grown_kb} KB over 200 cycles"
        assert list((mode.node.run_dir / "node-pods").iterdir()) == []


def test_a_pod_that_did_not_ask_is_untouched() -> None:
    with node_mode() as mode:
        asked, other = mode.new_pod(), mode.new_pod()
        asked.project_token()
        other.project_token()
        client = new_guid()
        mode.add_app(client, asked)
        proc = mode.start_node()
        before = netns.netfilter_snapshot(other.ns)
        watch = Opened(tree(other.kubelet_dir))
        try:
            assert mode.add(other, node_mode=False).returncode == 0
            assert mode.add(asked, {"azwi-netproxy.io/client-id": client}).returncode == 0
            assert asked.curl().status == 200  # an exchange for the pod that asked
            assert netns.netfilter_snapshot(other.ns) == before
            assert sockets_of(other.ns, proc.pid) == []
            assert watch.events() == []  # nothing under the other pod's dir was opened or read
            assert mode.delete(other).returncode == 0
        finally:
            watch.close()


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "named", "code"),
    [
        ({"azwi-netproxy.io/client-id": "not-a-guid"}, "azwi-netproxy.io/client-id", 7),
        ({"azwi-netproxy.io/tenant-id": "a tenant"}, "azwi-netproxy.io/tenant-id", 7),
        ({"azwi-netproxy.io/identity-map": "identities: []"}, "azwi-netproxy.io/identity-map", 7),
        ({"azwi-netproxy.io/identity-map": '{"identities": [{"clientID": "x"}]}'},
         "azwi-netproxy.io/identity-map", 7),
        ({"azwi-netproxy.io/proxy-port": "0"}, "azwi-netproxy.io/proxy-port", 7),
        ({"azwi-netproxy.io/node-proxy": "yes"}, "azwi-netproxy.io/node-proxy", 7),
        ({"azwi-netproxy.io/redirect": "true"}, "azwi-netproxy.io/redirect", 7),
        ({"azwi-netproxy.io/passthrough": "all"}, "azwi-netproxy.io/passthrough", 7),
    ],
    ids=["client-id", "tenant-id", "map-yaml", "map-bad-guid", "port", "node-proxy-value",
         "both-modes", "passthrough"],
)
def test_a_malformed_annotation_fails_add_with_code_7_and_changes_nothing(
        two_pods: TwoPods, annotations: dict[str, str], named: str, code: int) -> None:
    t = two_pods
    pod = t.mode.new_pod()
    before = netns.netfilter_snapshot(pod.ns)
    outcome = t.mode.add(pod, annotations)
    body = json.loads(outcome.stdout)
    assert outcome.returncode != 0 and set(body) <= ERROR_KEYS and body["code"] == code, outcome
    assert named in body["msg"] + body.get("details", ""), body
    assert netns.netfilter_snapshot(pod.ns) == before
    assert list((t.mode.node.run_dir / "node-pods").glob(f"{pod.runtime.container_id}*")) == []
    assert pod.curl(max_time_s=5).exit_code != 0


def test_a_missing_token_file_is_503_with_retry_after_and_a_warning_naming_it(two_pods: TwoPods) -> None:
    t = two_pods
    pod = t.mode.new_pod()  # no token projected
    assert t.mode.add(pod, {"azwi-netproxy.io/client-id": new_guid()}).returncode == 0
    got = curl_headers(pod)
    assert got.status == 503, got
    assert "retry-after: 1" in got.headers.lower()
    pattern = f"{pod.kubelet_dir}/volumes/kubernetes.io~projected/*/[token/]azure-identity-token"
    assert pattern in got.json()["error_description"]
    warnings = [e for e in t.mode.node_log_entries()
                if e.get("level") == "warn" and e.get("pod") == pod.full_name]
    assert any(e.get("path") == pattern for e in warnings), warnings
    assert t.mode.delete(pod).returncode == 0


def test_without_a_node_process_a_pod_that_asks_fails_add_with_code_11() -> None:
    with node_mode() as mode:
        pod = mode.new_pod()
        outcome = mode.add(pod)
        body = json.loads(outcome.stdout)
        assert outcome.returncode != 0 and body["code"] == 11 and "not running" in body["msg"], outcome
        assert list((mode.node.run_dir / "node-pods").glob("*.json")) == []
        # The rules were installed (fail closed): the runtime's DEL removes them.
        assert netns.probe(pod.ns, METADATA_IP, 80) == "refused"
        assert mode.delete(pod).returncode == 0


# ---- the node's own settings ---------------------------------------------------------------


def test_pass_through_when_the_node_allows_it_leaves_from_the_node_and_never_for_identity_paths(
        python_for_other_uids: str) -> None:
    with node_mode(AZWI_NODE_PASSTHROUGH="all") as mode:
        imds = netns.start_fake_in(mode.imds_ns, "fake_imds.py", f"{METADATA_IP}:80", mode.base / "imds.log")
        mode.stack.callback(stop_process, imds.proc)
        pod = mode.new_pod()
        pod.project_token()
        mode.start_node()
        assert mode.add(pod).returncode == 0
        got = pod.curl(INSTANCE_URL)
        assert got.status == 200 and "compute" in got.json(), got
        # A near-miss of the identity path is refused by the node process, never forwarded.
        refused = pod.curl(f"http://{METADATA_IP}/metadata/%69dentity/oauth2/token?resource=x&api-version=1")
        assert refused.status == 404, refused
        records = in_netns(mode.imds_ns, FakeImdsClient(f"http://{METADATA_IP}:80").records)
        assert [(r["path"], r["peer"]) for r in records] == [("/metadata/instance", "198.18.0.1")], records


def test_metrics_count_every_pod_and_name_none(two_pods: TwoPods) -> None:
    """The node process's metrics port (a second node process on the same pods' records is
    not needed: the module's one is restarted with the flag, and serves them again)."""
    t = two_pods
    t.mode.stop_node()
    try:
        t.mode.start_node("--metrics-port=9108")
        assert t.a.curl().status == 200 and t.b.curl().status == 200
        text = in_netns(t.mode.node_ns, lambda: http_request(9108, "/metrics", timeout_s=5).body).decode()
    finally:
        t.mode.stop_node()
        t.mode.start_node()
    assert "azwi_netproxy_node_pods 2.0" in text, text
    assert 'azwi_netproxy_requests_total{route="token",status="200"}' in text
    for secret in (t.a.full_name, t.b.full_name, t.a.namespace, t.c1, t.c2, t.a.uid, t.b.uid):
        assert secret not in text


def test_the_control_socket_answers_root_only(two_pods: TwoPods) -> None:
    t = two_pods
    sock = t.mode.node.run_dir / "node.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    # Even with the socket opened to everyone (a second link to it in a directory all may
    # search, mode 0666), a peer that is not root gets no answer.
    shared = shared_tempdir("azwi-node-sock-")
    link = shared / "node.sock"
    os.link(sock, link)
    link.chmod(0o666)
    try:
        asked = subprocess.run(
            ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", netns.SYSTEM_PYTHON, "-c", _ASK, str(link)],
            capture_output=True, text=True, timeout=30, check=False)
    finally:
        sock.chmod(0o600)
        shutil.rmtree(shared)
    assert asked.stdout.strip() == "no answer", asked
    assert any(e.get("message") == "control socket: refused a peer that is not root" and e.get("uid") == 1000
               for e in t.mode.node_log_entries())


_ASK = r"""
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.settimeout(5)
conn.connect(sys.argv[1])
try:
    conn.send(b'{"op": "ping"}')
    data = conn.recv(65536)
except OSError:  # closed on us: EPIPE or a reset
    data = b""
print(data.decode() or "no answer")
"""


def test_a_pod_whose_port_was_taken_during_a_restart_is_served_once_it_is_free() -> None:
    """A process of the pod may bind the proxy port while no node process runs (it answers
    only its own pod); the node process reports it once and serves the pod when it can."""
    with node_mode() as mode, netns.processes() as procs:
        pod = mode.new_pod()
        pod.project_token()
        client = new_guid()
        mode.add_app(client, pod)
        mode.start_node()
        assert mode.add(pod, {"azwi-netproxy.io/client-id": client}).returncode == 0
        mode.stop_node()
        squatter = netns.start_responder(procs, pod.ns, "127.0.0.1", 8000, "squatter")
        mode.start_node()
        time.sleep(0.5)
        assert pod.curl(max_time_s=5).status == 0  # the squatter's bytes are no HTTP answer
        procs.stop(squatter)
        assert seconds_until_served(pod, time.monotonic(), limit_s=15) is not None, mode.node_log()[-3000:]
        warnings = [e for e in mode.node_log_entries() if e.get("message") == "cannot serve a pod again"]
        assert len(warnings) == 1 and "Address already in use" in warnings[0]["error"], warnings
