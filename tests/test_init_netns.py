"""The init container in real network namespaces: real rules, real traffic, both backends.

Name: test_init_netns
Scope: one fresh namespace (or POD/IMDS/STS topology) per test, removed afterwards; the init
    runs as its own process inside it (`ip netns exec POD python -m azwi_netproxy.init`), as
    python-iptables needs. The last section drives `run_init` with hand-written fake
    backends for the decisions no namespace can stage (nft missing, both missing).
Depends: root + netns + nft (the `root` marker's probe), iptables-legacy-save and nft to
    observe (never used by the product), /usr/bin/python3 for clients run as other uids,
    support.netns.

What is asserted is issue 3: where traffic of each uid lands, fail-closed and its switch,
idempotence, --check/--cleanup/--dry-run, exit 2 on bad configuration with nothing changed,
the CAP_NET_ADMIN message, coexistence with a mesh's rules, and the `auto` choice.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import netns
from support.netns import Processes, Topology, hits, probe, start_responder

from azwi_netproxy.errors import RuleInstallError
from azwi_netproxy.init import rules
from azwi_netproxy.init.backend import NEEDS_CAP_NET_ADMIN, BackendName
from azwi_netproxy.init.config import InitConfig
from azwi_netproxy.init.run import run_init

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["nftables", "iptables"]
PROXY_UID, CLIENT_UID = 1501, 1000
DEFAULT = rules.Ruleset(proxy_port=8000, exempt_uid=PROXY_UID, metadata_ip=netns.METADATA_IP,
                        metadata_port=80)


# ---- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[Topology]:
    """Name: topo. Scope: function. A POD/IMDS/STS topology (support.netns.topology)."""
    with netns.topology() as built:
        yield built


@pytest.fixture
def pod() -> Iterator[str]:
    """Name: pod. Scope: function. One empty namespace with lo up, for rule-only tests."""
    with netns.namespace("azpod") as name:
        yield name


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Name: procs. Scope: function. Background processes, killed by PID at the end."""
    with netns.processes() as registry:
        yield registry


def init(ns: str, *args: str, env: dict[str, str] | None = None,
         uid: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real init program in `ns` (as root unless `uid`)."""
    return netns.run_in(ns, [sys.executable, "-m", "azwi_netproxy.init", *args],
                        env={**os.environ, **(env or {})}, uid=uid)


def init_ok(ns: str, *args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the init, insist on exit 0, return its JSON log lines."""
    done = init(ns, *args, env=env)
    assert done.returncode == 0, f"init {args} failed:\n{done.stdout}\n{done.stderr}"
    return logs(done.stderr)


def logs(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def chosen_backend(entries: list[dict[str, Any]]) -> str:
    (entry,) = [e for e in entries if e["message"] == "using backend"]
    return str(entry["backend"])


def without_ours(snapshot: str) -> list[str]:
    """A snapshot's lines minus our nft table and our iptables chains and jumps."""
    kept, in_our_table = [], False
    for line in snapshot.splitlines():
        if line == f"table ip {rules.NFT_TABLE} {{":
            in_our_table = True
        elif in_our_table and line == "}":
            in_our_table = False
        elif not in_our_table and "AZWI_PROXY" not in line and "azwi-proxy/" not in line:
            kept.append(line)
    return kept


MESH_NFT = """\
table ip mesh_init {
	chain output {
		type nat hook output priority -100; policy accept;
		meta skuid 2102 return
		oifname "lo" return
		tcp dport 9080 redirect to :4140
	}
}
"""

MESH_IPTABLES = [
    ["-t", "nat", "-N", "PROXY_INIT_OUTPUT"],
    ["-t", "nat", "-A", "PROXY_INIT_OUTPUT", "-m", "owner", "--uid-owner", "2102", "-j", "RETURN"],
    ["-t", "nat", "-A", "PROXY_INIT_OUTPUT", "-o", "lo", "-j", "RETURN"],
    ["-t", "nat", "-A", "PROXY_INIT_OUTPUT", "-p", "tcp", "--dport", "9080", "-j", "REDIRECT",
     "--to-ports", "4140"],
    ["-t", "nat", "-A", "OUTPUT", "-j", "PROXY_INIT_OUTPUT", "-m", "comment", "--comment",
     "proxy-init/install-proxy-init-output"],
    ["-t", "filter", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT"],
]


def install_mesh(ns: str, backend: str) -> None:
    """What another init container (linkerd/istio-like) would have put there first."""
    if backend == "nftables":
        done = netns.run_in(ns, ["nft", "-f", "-"], input=MESH_NFT)
        assert done.returncode == 0, done.stderr
        return
    for args in MESH_IPTABLES:
        done = netns.run_in(ns, ["iptables-legacy", *args])
        assert done.returncode == 0, done.stderr


# ---- traffic -----------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_lands_where_the_rules_say(topo: Topology, procs: Processes, backend: str) -> None:
    init_ok(topo.pod, "--backend", backend)
    ip = topo.metadata_ip
    proxy = start_responder(procs, topo.pod, "127.0.0.1", 8000, "proxy")
    imds = start_responder(procs, topo.imds, ip, 80, "imds")
    other_port = start_responder(procs, topo.imds, ip, 8080, "imds-8080")
    start_responder(procs, topo.imds, ip, 5353, "imds-udp", proto="udp")

    # The redirect: everybody but the proxy's uid lands on the proxy, root included.
    assert probe(topo.pod, ip, 80, uid=CLIENT_UID) == "proxy"
    assert probe(topo.pod, ip, 80) == "proxy"
    # The proxy's own pass-through reaches the real IMDS.
    assert probe(topo.pod, ip, 80, uid=PROXY_UID) == "imds"
    # Fail closed: other ports and protocols to METADATA_IP are rejected, at once.
    assert probe(topo.pod, ip, 8080, uid=CLIENT_UID) == "refused"
    assert probe(topo.pod, ip, 5353, uid=CLIENT_UID, proto="udp") == "error:EPERM"
    # The exemption is pass-through's TCP to port 80 only: the proxy's uid reaches nothing
    # else of the metadata address.
    assert probe(topo.pod, ip, 8080, uid=PROXY_UID) == "refused"
    assert probe(topo.pod, ip, 5353, uid=PROXY_UID, proto="udp") == "error:EPERM"

    # With the proxy down, a client is refused and never reaches IMDS.
    procs.stop(proxy)
    assert probe(topo.pod, ip, 80, uid=CLIENT_UID) == "refused"
    assert hits(procs, imds) == [topo.pod_imds_addr]  # the proxy uid's one connection
    assert hits(procs, other_port) == []


# The IMDS side closes after the client's FIN; the client's socket is orphaned by then.
_CLOSING_SERVER = r"""
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((sys.argv[1], 80))
sock.listen()
print("ready", flush=True)
conn, _ = sock.accept()
conn.recv(16)
conn.recv(16)
conn.close()
print("closed", flush=True)
sys.stdin.read()
"""

_CLOSING_CLIENT = r"""
import socket, sys
socket.create_connection((sys.argv[1], 80), timeout=3).sendall(b"GET")
"""


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_connections_to_imds_close_cleanly(
    topo: Topology, procs: Processes, backend: str
) -> None:
    """The `established` rule: an orphaned socket's last ACK is not rejected.

    Without it the owner match fails for the proxy's closed sockets, the final ACK is
    rejected, and IMDS keeps the connection in LAST-ACK (checked by hand when writing this).
    """
    init_ok(topo.pod, "--backend", backend)
    server = procs.start(topo.imds, [netns.SYSTEM_PYTHON, "-c", _CLOSING_SERVER,
                                     topo.metadata_ip], ready_line="ready")
    done = netns.run_in(topo.pod, [netns.SYSTEM_PYTHON, "-c", _CLOSING_CLIENT, topo.metadata_ip],
                        uid=PROXY_UID)
    assert done.returncode == 0, done.stderr
    assert server.stdout is not None and server.stdout.readline() == "closed\n"
    deadline = time.monotonic() + 3
    while True:
        states = netns.run_in(topo.imds, ["ss", "-tanH", "state", "last-ack"]).stdout.strip()
        if not states or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert states == ""


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_other_metadata_traffic(topo: Topology, procs: Processes, backend: str) -> None:
    ip = topo.metadata_ip
    start_responder(procs, topo.pod, "127.0.0.1", 8000, "proxy")
    start_responder(procs, topo.imds, ip, 8080, "imds-8080")

    init_ok(topo.pod, "--backend", backend, "--allow-other-metadata-traffic")
    assert probe(topo.pod, ip, 8080, uid=CLIENT_UID) == "imds-8080"
    assert probe(topo.pod, ip, 80, uid=CLIENT_UID) == "proxy"
    fail_open = netns.netfilter_snapshot(topo.pod)
    assert "filter_output" not in fail_open and "AZWI_PROXY_FILTER" not in fail_open

    # Running again without the flag adds fail-closed; with it again, removes it again.
    init_ok(topo.pod, "--backend", backend)
    assert probe(topo.pod, ip, 8080, uid=CLIENT_UID) == "refused"
    init_ok(topo.pod, "--backend", backend, "--allow-other-metadata-traffic")
    assert probe(topo.pod, ip, 8080, uid=CLIENT_UID) == "imds-8080"
    assert netns.netfilter_snapshot(topo.pod) == fail_open


# ---- rule management ---------------------------------------------------------------------


def tamper(ns: str, backend: str) -> None:
    if backend == "nftables":
        done = netns.run_in(ns, ["nft", "add", "rule", "ip", rules.NFT_TABLE,
                                 rules.NFT_NAT_CHAIN, "counter"])
    else:
        done = netns.run_in(ns, ["iptables-legacy", "-t", "nat", "-D", rules.IPT_OUTPUT_CHAIN, "1"])
    assert done.returncode == 0, done.stderr


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_idempotent_install_check_and_cleanup(pod: str, backend: str) -> None:
    before = netns.netfilter_snapshot(pod)
    env = {"PROXY_PORT": "15080"}

    entries = init_ok(pod, "--backend", backend, env=env)
    once = netns.netfilter_snapshot(pod)
    assert once != before
    # The install log ends with the rules the kernel holds.
    assert entries[-1]["message"] == "installed rules"
    assert [e["level"] for e in entries] == ["info", "info"], entries
    assert entries[-1]["backend"] == backend
    assert "15080" in entries[-1]["rules"]
    init_ok(pod, "--backend", backend, env=env)
    assert netns.netfilter_snapshot(pod) == once

    assert init(pod, "--check", env=env).returncode == 0
    other_port = init(pod, "--check", "--proxy-port", "9000")
    assert other_port.returncode == 1
    assert "9000" in other_port.stdout

    tamper(pod, backend)
    tampered = init(pod, "--check", env=env)
    assert tampered.returncode == 1
    assert tampered.stdout.strip(), "check must print what differs"
    init_ok(pod, "--backend", backend, env=env)
    assert netns.netfilter_snapshot(pod) == once
    assert init(pod, "--check", env=env).returncode == 0

    init_ok(pod, "--cleanup")
    assert netns.netfilter_snapshot(pod) == before
    missing = init(pod, "--check", "--backend", backend, env=env)
    assert missing.returncode == 1
    assert "missing" in missing.stdout
    init_ok(pod, "--cleanup", "--backend", backend)  # nothing left: still fine
    assert netns.netfilter_snapshot(pod) == before


@pytest.mark.root
@pytest.mark.parametrize(("backend", "shown"), [("nftables", "nftables"),
                                                 ("iptables", "iptables"),
                                                 ("auto", "nftables")])
def test_dry_run_changes_nothing(pod: str, backend: str, shown: BackendName) -> None:
    before, tables_before = netns.netfilter_snapshot(pod), netns.legacy_tables(pod)
    done = init(pod, "--dry-run", "--backend", backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout == rules.render_text(DEFAULT, shown) + "\n"
    assert netns.netfilter_snapshot(pod) == before
    # Not even an empty legacy table was created by probing.
    assert netns.legacy_tables(pod) == tables_before


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {"PROXY_PORT": "0"}),
        (["--metadata-port", "65536"], {}),
        ([], {"PROXY_UID": "abc"}),
        (["--metadata-ip", "::1"], {"METADATA_IP": "169.254.169.254"}),
        (["--proxy-uid", "1501"], {"METADATA_IP": "::1"}),
    ],
    ids=["env-port-0", "flag-port-65536", "env-uid-abc", "flag-ip-v6", "env-ip-v6"],
)
def test_bad_configuration_exits_2_and_changes_nothing(
    pod: str, args: list[str], env: dict[str, str]
) -> None:
    before, tables_before = netns.netfilter_snapshot(pod), netns.legacy_tables(pod)
    done = init(pod, "--backend", "iptables", *args, env=env)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("azwi-netproxy-init: error: ")
    assert done.stdout == ""
    assert netns.netfilter_snapshot(pod) == before
    assert netns.legacy_tables(pod) == tables_before


@pytest.mark.root
@pytest.mark.parametrize(
    ("backend", "action"),
    [("nftables", "install"), ("iptables", "install"), ("auto", "install"),
     ("auto", "check"), ("auto", "cleanup"), ("iptables", "cleanup")],
)
def test_without_cap_net_admin_the_error_says_so(
    pod: str, backend: str, action: str, python_for_other_uids: str
) -> None:
    before = netns.netfilter_snapshot(pod)
    flags = [] if action == "install" else [f"--{action}"]
    done = netns.run_in(
        pod, [python_for_other_uids, "-m", "azwi_netproxy.init", "--backend", backend, *flags],
        uid=CLIENT_UID, env=dict(os.environ),
    )
    assert done.returncode == 1, done.stderr
    last = logs(done.stderr)[-1]
    assert last["level"] == "error"
    assert "needs CAP_NET_ADMIN" in last["error"]
    assert netns.netfilter_snapshot(pod) == before


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_coexists_with_a_mesh(pod: str, backend: str) -> None:
    install_mesh(pod, backend)
    before = netns.netfilter_snapshot(pod)

    entries = init_ok(pod)  # auto
    assert chosen_backend(entries) == backend
    installed = netns.netfilter_snapshot(pod)
    assert without_ours(installed) == before.splitlines()  # untouched, same order
    if backend == "iptables":
        nat_output = netns.run_in(pod, ["iptables-legacy", "-t", "nat", "-S", "OUTPUT"]).stdout
        assert nat_output.splitlines()[1:] == [
            '-A OUTPUT -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_OUTPUT',
            '-A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" '
            "-j PROXY_INIT_OUTPUT",
        ]

    init_ok(pod)
    assert netns.netfilter_snapshot(pod) == installed
    assert init(pod, "--check").returncode == 0
    init_ok(pod, "--cleanup")
    assert netns.netfilter_snapshot(pod) == before


@pytest.mark.root
@pytest.mark.parametrize(
    ("setup", "expected", "reason"),
    [
        ([], "nftables", "the kernel supports nftables and the namespace has no rules yet"),
        ([["iptables-legacy", "-t", "nat", "-S"]], "nftables",
         "the kernel supports nftables and the namespace has no rules yet"),
        ([["iptables-legacy", "-t", "filter", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"]],
         "iptables", "the namespace already has legacy iptables rules"),
        ([["iptables-legacy", "-t", "mangle", "-P", "OUTPUT", "DROP"]],
         "iptables", "the namespace already has legacy iptables rules"),
        ([["nft", "add", "table", "inet", "other"]], "nftables",
         "the namespace already has nftables tables"),
    ],
    ids=["fresh", "empty-legacy-tables", "legacy-rule", "legacy-policy", "nft-table"],
)
def test_auto_choice(pod: str, setup: list[list[str]], expected: str, reason: str) -> None:
    for argv in setup:
        assert netns.run_in(pod, argv).returncode == 0
    entries = init_ok(pod, "--dry-run")
    (using,) = [e for e in entries if e["message"] == "dry run: nothing changed"]
    assert (using["backend"], using["reason"]) == (expected, reason)
    # The install decides the same way; the run after it finds its own rules first.
    assert chosen_backend(init_ok(pod)) == expected
    entries = init_ok(pod, "--dry-run")
    (using,) = [e for e in entries if e["message"] == "dry run: nothing changed"]
    assert using["reason"] == (
        "our nftables table is already installed" if expected == "nftables"
        else "our legacy iptables chains are already installed"
    )


@pytest.mark.root
@pytest.mark.parametrize(("first", "second"), [("iptables", "nftables"),
                                               ("nftables", "iptables")])
def test_switching_backend_leaves_one_copy(pod: str, first: str, second: str) -> None:
    before = netns.netfilter_snapshot(pod)
    init_ok(pod, "--backend", first)
    entries = init_ok(pod, "--backend", second)
    assert [e["backend"] for e in entries
            if e["message"] == "removed our rules of the other backend"] == [first]
    snapshot = netns.netfilter_snapshot(pod)
    assert ("AZWI_PROXY" in snapshot) == (second == "iptables")
    assert ("azwi_proxy" in snapshot) == (second == "nftables")
    init_ok(pod, "--cleanup")
    assert netns.netfilter_snapshot(pod) == before


# ---- decisions no namespace can stage: fake backends -------------------------------------


class FakeBackend:
    """A backend with behaviour: it keeps an installed ruleset and can be made to fail."""

    def __init__(self, name: BackendName, *, unsupported: str | None = None,
                 others: bool = False, refuse: bool = False) -> None:
        self._name: BackendName = name
        self.unsupported = unsupported
        self.others = others
        self.refuse = refuse
        self.installed: rules.Ruleset | None = None

    @property
    def name(self) -> BackendName:
        return self._name

    def _kernel(self) -> None:
        if self.refuse:
            raise RuleInstallError(f"{self._name}: listing was refused: {NEEDS_CAP_NET_ADMIN}")

    def unsupported_reason(self) -> str | None:
        self._kernel()
        return self.unsupported

    def present(self) -> bool:
        self._kernel()
        return self.installed is not None

    def in_use_by_others(self) -> bool:
        self._kernel()
        return self.others

    def install(self, ruleset: rules.Ruleset) -> None:
        self._kernel()
        self.installed = ruleset

    def check(self, ruleset: rules.Ruleset) -> list[str]:
        if self.installed is None:
            return [f"{self._name}: missing"]
        return [] if self.installed == ruleset else [f"{self._name}: differs"]

    def cleanup(self) -> bool:
        removed, self.installed = self.installed is not None, None
        return removed

    def listing(self) -> str:
        return "" if self.installed is None else f"{self._name} rules"


def _run(nft: FakeBackend, ipt: FakeBackend, **cfg: object) -> tuple[int, str]:
    out = io.StringIO()
    config = InitConfig(**cfg)  # type: ignore[arg-type]
    code = run_init(config, backends={"nftables": nft, "iptables": ipt}, out=out)
    return code, out.getvalue()


def test_auto_falls_back_to_iptables_without_nft() -> None:
    nft = FakeBackend("nftables", unsupported="the nft command is not installed")
    ipt = FakeBackend("iptables")
    assert _run(nft, ipt) == (0, "")
    assert ipt.installed == DEFAULT and nft.installed is None


def test_explicit_backend_that_cannot_work_fails() -> None:
    nft = FakeBackend("nftables", unsupported="the nft command is not installed")
    ipt = FakeBackend("iptables")
    assert _run(nft, ipt, backend="nftables") == (1, "")
    assert ipt.installed is None


def test_auto_without_any_backend_fails() -> None:
    nft = FakeBackend("nftables", unsupported="no nft")
    ipt = FakeBackend("iptables", unsupported="no libiptc")
    assert _run(nft, ipt)[0] == 1
    assert _run(nft, ipt, action="cleanup")[0] == 1
    # A dry run still shows the rules.
    assert _run(nft, ipt, action="dry-run") == (0, rules.render_text(DEFAULT, "nftables") + "\n")


def test_refused_probe_is_not_a_fallback() -> None:
    """EPERM on nft means no capability, not 'no nftables': iptables would fail the same."""
    nft = FakeBackend("nftables", refuse=True)
    ipt = FakeBackend("iptables")
    assert _run(nft, ipt)[0] == 1
    assert ipt.installed is None


def test_check_prints_every_difference() -> None:
    nft, ipt = FakeBackend("nftables"), FakeBackend("iptables")
    nft.installed = DEFAULT
    ipt.installed = DEFAULT
    assert _run(nft, ipt, action="check") == (
        1, "iptables: rules of ours are installed there too\n")
    assert _run(nft, ipt, action="check", proxy_port=9000) == (
        1, "nftables: differs\niptables: rules of ours are installed there too\n")


def test_cleanup_auto_removes_ours_from_both() -> None:
    nft, ipt = FakeBackend("nftables"), FakeBackend("iptables")
    nft.installed = ipt.installed = DEFAULT
    assert _run(nft, ipt, action="cleanup") == (0, "")
    assert nft.installed is None and ipt.installed is None
