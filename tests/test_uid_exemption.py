"""Who in the pod reaches the metadata address, judged by tripwires, never by reading the rules.

Name: test_uid_exemption
Scope: module: one whole pod (support.pod) per front end (the init container, the CNI
    plugin's ADD) and backend (nftables, iptables), once with `AZWI_PASSTHROUGH=none` (the
    pod annotation `azwi-netproxy.io/passthrough: "none"` in CNI mode) and once with
    pass-through on (the default); function: the tripwires.
Depends: root + netns + nft (the `root` marker), support.pod, support.netns (responders,
    probes), support.cni_node and the reference CNI plugins for the CNI pods.

The tripwires are real listeners in the fake IMDS namespace on the metadata address: TCP on
port 80 (in a pod with pass-through on, the fake IMDS itself, which records every request)
and on other ports, UDP on 53, 123 and 80; ICMP echo is answered by that namespace's kernel.
They stand for the node's IMDS: whatever reaches them would have reached the node's
identity. Each test asks as every kind of process a pod may hold:

- uid 1000, an app;
- uid 1501, the proxy's uid (another container run as 1501);
- root;
- root switching to 1501 with setpriv, keeping its gid 0 and groups (the cheapest switch).

The claims (SECURITY.md):
- with `none`, no uid is exempt: each of them gets its token from the proxy, other IMDS paths
  are refused by the proxy (403), and no tripwire sees anything, on any port or protocol;
- with pass-through on, the exemption is pass-through's own TCP to METADATA_IP:METADATA_PORT:
  a process running as 1501 (root can become it) reaches the node's IMDS there, and only
  there. This is the documented limit of pass-through, shown so it cannot widen unnoticed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from support import netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import REFERENCE_PLUGINS, Node, Runtime, cluster_conflist, node
from support.fake_entra import decode_fake_token
from support.fake_imds import NODE_TOKEN_MARK
from support.netns import METADATA_IP, Processes, hits, probe_many, start_responder
from support.pod import INSTANCE_URL, TOKEN_URL, PodSandbox, build_pod

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CAN_NETNS, reason=NETNS_SKIP_REASON),
]

MODES = [("init", "nftables"), ("init", "iptables"), ("cni", "nftables"), ("cni", "iptables")]
MODE_IDS = [f"{mode}-{backend}" for mode, backend in MODES]

# Every kind of process a pod may hold: keyword arguments of PodSandbox.curl and probe_many.
WHO: dict[str, dict[str, Any]] = {
    "uid-1000": {"uid": 1000},
    "uid-1501": {"uid": 1501},
    "root": {"uid": None},
    "root-setpriv-1501": {"uid": None, "via": ("setpriv", "--reuid=1501")},
}
OTHER_TCP_PORTS = [443, 8080, 22, 32526, 2375]
UDP_PORTS = [53, 123, 80]
TARGETS: list[netns.Target] = [
    *((METADATA_IP, port, "tcp") for port in OTHER_TCP_PORTS),
    *((METADATA_IP, port, "udp") for port in UDP_PORTS),
    (METADATA_IP, 0, "icmp"),
    (f"::ffff:{METADATA_IP}", 8080, "tcp"),
]
# Rejected at once by the fail-closed rules: TCP with a reset, the rest with an ICMP error
# that the sending socket sees as EPERM.
BLOCKED = [*(["refused"] * len(OTHER_TCP_PORTS)), *(["error:EPERM"] * len(UDP_PORTS)),
           "error:EPERM", "refused"]
# What the proxy adds to every request it passes through (CONTRACT.md: its loop marker).
LOOP_MARKER = "x-azwi-netproxy-loop"


# ---- the pods ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cni_node() -> Iterator[Node]:
    """Name: cni_node. Scope: module. A node with the CNI agent running (support.cni_node)."""
    if not (REFERENCE_PLUGINS / "loopback").exists():
        pytest.skip("the reference CNI plugins are missing (apt-get install containernetworking-plugins)")
    with node(cluster_conflist()) as made:
        made.start_agent()
        yield made


def _build(request: pytest.FixtureRequest, passthrough: str) -> Iterator[PodSandbox]:
    mode, backend = request.param
    python = request.getfixturevalue("python_for_other_uids")
    pythonpath = request.getfixturevalue("package_pythonpath")
    redirect = None
    if mode == "cni":
        the_node: Node = request.getfixturevalue("cni_node")
        conflist = json.loads(json.dumps(the_node.conflist()))
        next(p for p in conflist["plugins"] if p["type"] == "azwi-netproxy")["backend"] = backend
        # Pass-through on is what a pod gets without the annotation.
        annotations = {"azwi-netproxy.io/redirect": "true"}
        if passthrough == "none":
            annotations["azwi-netproxy.io/passthrough"] = "none"

        def redirect(sandbox: PodSandbox) -> None:
            runtime = Runtime([the_node.bin_dir, REFERENCE_PLUGINS], container_id=uuid.uuid4().hex,
                              netns=f"/run/netns/{sandbox.topo.pod}", annotations=annotations)
            outcome = runtime.add(conflist)
            assert outcome.returncode == 0, f"ADD failed:\n{outcome}"

    with ExitStack() as stack:
        sandbox = build_pod(stack, backend, python, pythonpath, redirect=redirect, passthrough=passthrough)
        # Ping sockets for every gid, in POD only (the sysctl is per namespace).
        done = netns.run_in(sandbox.topo.pod, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        assert done.returncode == 0, done.stderr
        yield sandbox


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def sealed_pod(request: pytest.FixtureRequest) -> Iterator[PodSandbox]:
    """Name: sealed_pod. Scope: module, per front end and backend. A pod with pass-through off:
    the init and the proxy run with AZWI_PASSTHROUGH=none, or ADD saw the pod's annotation."""
    yield from _build(request, "none")


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def exempt_pod(request: pytest.FixtureRequest) -> Iterator[PodSandbox]:
    """Name: exempt_pod. Scope: module, per front end and backend. A pod with pass-through on."""
    yield from _build(request, "all")


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Name: procs. Scope: function. The tripwires, killed by PID at the end."""
    with netns.processes() as registry:
        yield registry


def _tripwires(procs: Processes, sandbox: PodSandbox, *, tcp_80: bool) -> dict[str, Any]:
    """Listeners on the metadata address in the IMDS namespace, by "tcp/PORT" / "udp/PORT"."""
    ports = [80, *OTHER_TCP_PORTS] if tcp_80 else OTHER_TCP_PORTS
    wires = {f"tcp/{port}": start_responder(procs, sandbox.topo.imds, METADATA_IP, port, f"trip-tcp-{port}")
             for port in ports}
    wires |= {f"udp/{port}": start_responder(procs, sandbox.topo.imds, METADATA_IP, port, f"trip-udp-{port}",
                                             proto="udp")
              for port in UDP_PORTS}
    return wires


def _token_outcome(sandbox: PodSandbox, who: str) -> str:
    """What a token request as `who` got: the pod's token from the fake Entra through the
    proxy ("pod-token"), the node's from its IMDS ("node-token"), or what else happened."""
    got = sandbox.curl(TOKEN_URL, **WHO[who])
    if got.status == 200 and NODE_TOKEN_MARK in got.body:
        return "node-token"
    if got.status != 200:
        return f"HTTP {got.status}, curl exit {got.exit_code}: {got.body[:80]!r} {got.stderr[:120]!r}"
    token = got.json()["access_token"]
    exchange = sandbox.exchange_of(token)  # minted by the fake Entra, for this pod's identity
    assert exchange["client_id"] == sandbox.identity.client_id, exchange
    assert decode_fake_token(token)["tid"] == sandbox.identity.tenant_id.lower()
    return "pod-token"


# ---- pass-through off: nothing reaches the metadata address but through the proxy ---------


def test_with_passthrough_none_every_uid_reaches_only_the_proxy(sealed_pod: PodSandbox, procs: Processes) -> None:
    sandbox = sealed_pod
    wires = _tripwires(procs, sandbox, tcp_80=True)
    outcomes = {}
    for who, how in WHO.items():
        instance = sandbox.curl(INSTANCE_URL, **how)
        outcomes[who] = {
            "token": _token_outcome(sandbox, who),
            # The proxy's answer: it never goes to IMDS (CONTRACT: --passthrough none).
            "instance": (instance.status, instance.json().get("error") if instance.status == 403 else instance.body[:80]),
            "other ports and protocols": probe_many(sandbox.topo.pod, TARGETS, **how),
        }
    # The tripwires first: what reached the metadata address, by port and source address.
    assert {name: hits(procs, wire) for name, wire in wires.items()} == {name: [] for name in wires}
    expected = {"token": "pod-token", "instance": (403, "forbidden"), "other ports and protocols": BLOCKED}
    assert outcomes == dict.fromkeys(WHO, expected)


# ---- pass-through on: the exemption is TCP to METADATA_IP:METADATA_PORT as 1501, no more --


def test_with_passthrough_on_uid_1501_reaches_imds_on_its_port_only(exempt_pod: PodSandbox,
                                                                      procs: Processes) -> None:
    """The known limit (SECURITY.md): whoever runs as 1501 (root can switch to it) reaches the
    node's IMDS on TCP METADATA_PORT, the node's token included. Nothing else, for anyone."""
    sandbox = exempt_pod
    wires = _tripwires(procs, sandbox, tcp_80=False)  # TCP 80 is the fake IMDS: its records
    seen = len(sandbox.imds_records())
    outcomes = {who: {"token": _token_outcome(sandbox, who),
                      "other ports and protocols": probe_many(sandbox.topo.pod, TARGETS, **how)}
                for who, how in WHO.items()}
    assert {name: hits(procs, wire) for name, wire in wires.items()} == {name: [] for name in wires}
    door = {"token": "node-token", "other ports and protocols": BLOCKED}
    shut = {"token": "pod-token", "other ports and protocols": BLOCKED}
    assert outcomes == {"uid-1000": shut, "uid-1501": door, "root": shut, "root-setpriv-1501": door}
    # The two that came through are direct requests, not the proxy's pass-through.
    direct = sandbox.imds_records()[seen:]
    assert [r["path"] for r in direct] == ["/metadata/identity/oauth2/token"] * 2, direct
    for record in direct:
        assert LOOP_MARKER not in {name.lower() for name, _ in record["headers"]}, record
