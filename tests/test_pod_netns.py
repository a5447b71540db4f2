"""The whole pod in real network namespaces: init + proxy + fakes + real clients, both backends.

Name: test_pod_netns
Scope: one pod per backend for the module (support.pod's `pod_sandbox`, parametrised over
    nftables and iptables); the function-scoped `pod` puts back whatever a test changed
    (rules, the proxy), so tests can stop the proxy, clean up the rules or run a mesh.
Depends: root + netns + nft (the `root` marker), curl, azure-identity in the venv,
    Node.js 20+ with @azure/identity (scripts/bootstrap.sh; its tests skip without),
    support.pod (the pod), support.netns (responders and probes).

What is asserted is issue 3 end to end, as an app in the pod sees it: curl,
azure-identity's ManagedIdentityCredential and the JavaScript SDK's ManagedIdentityCredential
and DefaultAzureCredential (no endpoint override) as uid 1000 get the fake Entra's tokens
through the proxy and the node's IMDS sees no token request; other IMDS
paths pass through as uid 1501; with the proxy down nothing reaches IMDS; another pod cannot
reach the proxy; install, --check, --cleanup and --dry-run on a live pod, next to a mesh's
rules; and a proxy run as the wrong uid reports its pass-through loop instead of recursing.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import netns
from support.fake_entra import decode_fake_token
from support.fake_imds import INSTANCE
from support.netns import METADATA_IP, Processes, hits, probe, start_responder

from azwi_netproxy.init import rules

# support.pod is both this module's helper library and its fixture plugin (pytest_plugins
# below); registered before its import so pytest still rewrites its asserts.
pytest.register_assert_rewrite("support.pod")
from support.pod import (  # noqa: E402
    CLIENT_UID,
    INSTANCE_URL,
    PROXY_PORT,
    PROXY_UID,
    RULESET,
    TOKEN_URL,
    PodSandbox,
)

pytest_plugins = ["support.pod"]
pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

MANAGEMENT = "https://management.azure.com/"
# CONTRACT: scope = resource + "/.default", so this resource's scope has "//" as upstream's
# getScope makes it (Entra accepts it).
MANAGEMENT_SCOPE = MANAGEMENT + "/.default"
IMDS_FIELDS = {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
               "not_before", "resource", "token_type"}


@pytest.fixture
def pod(live_pod: PodSandbox) -> PodSandbox:
    """Name: pod. Scope: function. Depends: support.pod's live_pod (restored after the test)."""
    return live_pod


@pytest.fixture
def procs(pod_procs: Processes) -> Processes:
    """Name: procs. Scope: function. Depends: support.pod's pod_procs."""
    return pod_procs


def token_requests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "/identity/" in r["path"].lower()]


def assert_token_for(pod: PodSandbox, access_token: str, scope: str) -> None:
    """The token is the fake Entra's, for the pod's identity and `scope`, minted by an
    exchange of the pod's service account token."""
    ident = pod.identity
    claims = decode_fake_token(access_token)
    assert (claims["tid"], claims["appid"], claims["scp"], claims["sub"]) == (
        ident.tenant_id, ident.client_id, scope, ident.subject)
    exchange = pod.exchange_of(access_token)
    assert exchange["path"] == f"/{ident.tenant_id}/oauth2/v2.0/token"
    assert exchange["form"]["client_assertion"] == ident.token.read()
    assert exchange["form"]["grant_type"] == "client_credentials"


def proxy_access_lines(pod: PodSandbox, offsets: dict[Path, int]) -> list[dict[str, Any]]:
    """The proxy's access lines (JSON with a "uri") written since `offsets`."""
    lines = [json.loads(line) for name, text in pod.logs_since(offsets) if "-proxy-" in name
             for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if "uri" in line]


def curl_token(pod: PodSandbox) -> str:
    got = pod.curl(TOKEN_URL)
    assert got.status == 200, got
    token = got.json()["access_token"]
    assert_token_for(pod, token, MANAGEMENT_SCOPE)
    return str(token)


# ---- tokens ------------------------------------------------------------------------------


@pytest.mark.root
def test_curl_gets_the_pods_token_through_the_proxy(pod: PodSandbox) -> None:
    got = pod.curl(TOKEN_URL)
    assert got.status == 200, got
    doc = got.json()
    assert set(doc) == IMDS_FIELDS
    assert all(isinstance(v, str) for v in doc.values()), doc
    assert (doc["client_id"], doc["resource"], doc["token_type"]) == (
        pod.identity.client_id, MANAGEMENT, "Bearer")
    assert doc["expires_on"].isdigit() and int(doc["expires_on"]) > time.time()
    assert_token_for(pod, doc["access_token"], MANAGEMENT_SCOPE)
    assert token_requests(pod.imds_records()) == []


@pytest.mark.root
def test_azure_identity_without_overrides_gets_the_pods_token(pod: PodSandbox) -> None:
    # A scope no other test asks for, so this exchange is the SDK's own.
    scope = "https://storage.azure.com/.default"
    exchanges_before = len(pod.entra_exchanges())
    got = pod.sdk_token(scope)
    assert_token_for(pod, got["token"], scope)
    assert got["expires_on"] > time.time()
    assert len(pod.entra_exchanges()) == exchanges_before + 1
    assert token_requests(pod.imds_records()) == []


@pytest.mark.root
@pytest.mark.parametrize(("credential", "scope", "explicit_client_id"), [
    ("ManagedIdentityCredential", "https://vault.azure.net/.default", False),
    ("ManagedIdentityCredential", "https://database.windows.net/.default", True),
    ("DefaultAzureCredential", "https://graph.microsoft.com/.default", False),
], ids=["managed-identity", "managed-identity-client-id", "default-credential"])
def test_node_azure_identity_without_overrides_gets_the_pods_token(
        pod: PodSandbox, credential: str, scope: str, explicit_client_id: bool) -> None:
    # msal-node asks with api-version 2018-02-01, client_id when given one, and reads
    # expires_on. DefaultAzureCredential first probes IMDS without the Metadata header and
    # without a query (any answer means "there is an IMDS"): the proxy must answer that at
    # once, and neither request may reach the node's IMDS.
    offsets = pod.log_offsets()
    exchanges_before = len(pod.entra_exchanges())
    got = pod.node_sdk_token(credential, scope, pod.identity.client_id if explicit_client_id else None)
    assert_token_for(pod, got["token"], scope)
    assert got["expires_on_ms"] / 1000 > time.time() + 3000
    assert len(pod.entra_exchanges()) == exchanges_before + 1
    assert token_requests(pod.imds_records()) == []
    # The proxy's access lines for them (written within 50 ms of the answers).
    probe = ("/metadata/identity/oauth2/token", 400)
    deadline = time.monotonic() + 5
    while True:
        answered = [(line["uri"], line["status"]) for line in proxy_access_lines(pod, offsets)
                    if line["uri"].startswith("/metadata/")]
        if any(status == 200 for _, status in answered) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tokens = [uri for uri, status in answered if status == 200]
    assert len(tokens) == 1, answered
    assert tokens[0].startswith("/metadata/identity/oauth2/token?api-version=2018-02-01&"), answered
    assert ("&client_id=" in tokens[0]) == explicit_client_id, answered
    if credential == "DefaultAzureCredential":
        assert probe in answered, answered
        assert answered.index(probe) < answered.index((tokens[0], 200)), answered


@pytest.mark.root
def test_other_metadata_paths_pass_through_to_imds(pod: PodSandbox) -> None:
    before = len(pod.imds_records())
    got = pod.curl(INSTANCE_URL, "X-Forwarded-For: 203.0.113.7")
    assert got.status == 200, got
    assert got.json() == INSTANCE
    (record,) = pod.imds_records()[before:]
    assert (record["method"], record["path"], record["query"]) == (
        "GET", "/metadata/instance", "api-version=2021-02-01")
    headers = {name.lower(): value for name, value in record["headers"]}
    assert headers["metadata"] == "true"
    assert "x-forwarded-for" not in headers


# ---- fail closed and isolation ---------------------------------------------------------------


@pytest.mark.root
def test_with_the_proxy_down_nothing_reaches_imds(pod: PodSandbox, procs: Processes) -> None:
    other_port = start_responder(procs, pod.topo.imds, METADATA_IP, 8080, "imds-8080")
    assert pod.proxy is not None
    before = len(pod.imds_records())
    pod.stop_proxy(signal.SIGKILL)

    for url in (TOKEN_URL, INSTANCE_URL):
        got = pod.curl(url)
        assert (got.exit_code, got.status) == (7, 0), got  # 7: could not connect
    assert probe(pod.topo.pod, METADATA_IP, 80, uid=CLIENT_UID) == "refused"
    assert probe(pod.topo.pod, METADATA_IP, 8080, uid=CLIENT_UID) == "refused"
    # The proxy's uid is exempt for pass-through's TCP to port 80 only.
    assert probe(pod.topo.pod, METADATA_IP, 8080, uid=PROXY_UID) == "refused"

    assert pod.imds_records()[before:] == []
    assert hits(procs, other_port) == []


@pytest.mark.root
def test_another_pod_cannot_reach_the_proxy(pod: PodSandbox) -> None:
    topo = pod.topo
    assert topo.peer is not None
    assert pod.readyz() == 200  # it is up, on 127.0.0.1 only
    assert probe(topo.peer, topo.pod_peer_addr, PROXY_PORT) == "refused"


# ---- the init on a live pod ----------------------------------------------------------------


@pytest.mark.root
def test_init_twice_changes_nothing_and_check_passes(pod: PodSandbox) -> None:
    pod.init_ok()
    assert pod.snapshot() == pod.installed
    assert pod.init("--check").returncode == 0
    curl_token(pod)


@pytest.mark.root
def test_cleanup_restores_the_previous_rules(pod: PodSandbox) -> None:
    pod.init_ok("--cleanup")
    assert pod.snapshot() == pod.pristine
    assert pod.init("--check").returncode == 1

    pod.init_ok()
    assert pod.snapshot() == pod.installed
    assert pod.init("--check").returncode == 0
    curl_token(pod)


@pytest.mark.root
def test_dry_run_changes_nothing(pod: PodSandbox) -> None:
    shown = rules.render_text(RULESET, pod.backend) + "\n"  # type: ignore[arg-type]
    tables = netns.legacy_tables(pod.topo.pod)

    done = pod.init_ok("--dry-run")
    assert done.stdout == shown
    assert pod.snapshot() == pod.installed
    assert netns.legacy_tables(pod.topo.pod) == tables

    pod.init_ok("--cleanup")
    assert pod.init_ok("--dry-run").stdout == shown
    assert pod.snapshot() == pod.pristine
    assert netns.legacy_tables(pod.topo.pod) == tables


MESH_NFT = """\
table ip istio_like {
	chain output {
		type nat hook output priority -100; policy accept;
		meta skuid 1337 return
		oifname "lo" return
		tcp dport 9080 redirect to :15001
	}
}
"""

MESH_IPTABLES = [
    ["-t", "nat", "-N", "ISTIO_OUTPUT"],
    ["-t", "nat", "-A", "ISTIO_OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"],
    ["-t", "nat", "-A", "ISTIO_OUTPUT", "-o", "lo", "-j", "RETURN"],
    ["-t", "nat", "-A", "ISTIO_OUTPUT", "-p", "tcp", "--dport", "9080", "-j", "REDIRECT",
     "--to-ports", "15001"],
    ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
]


def install_mesh(pod: PodSandbox) -> None:
    """An istio-like sidecar's redirect of port 9080, in the pod's backend."""
    if pod.backend == "nftables":
        done = netns.run_in(pod.topo.pod, ["nft", "-f", "-"], input=MESH_NFT)
        assert done.returncode == 0, done.stderr
        return
    for args in MESH_IPTABLES:
        done = netns.run_in(pod.topo.pod, ["iptables-legacy", *args])
        assert done.returncode == 0, done.stderr


@pytest.mark.root
def test_coexists_with_a_mesh_installed_first(pod: PodSandbox, procs: Processes) -> None:
    topo = pod.topo
    start_responder(procs, topo.pod, "127.0.0.1", 15001, "mesh")
    pod.init_ok("--cleanup")
    install_mesh(pod)
    mesh_only = pod.snapshot()
    assert probe(topo.pod, topo.sts_addr, 9080, uid=CLIENT_UID) == "mesh"

    pod.init_ok()
    assert pod.init("--check").returncode == 0
    curl_token(pod)
    assert probe(topo.pod, topo.sts_addr, 9080, uid=CLIENT_UID) == "mesh"

    pod.init_ok("--cleanup")
    assert pod.snapshot() == mesh_only
    assert probe(topo.pod, topo.sts_addr, 9080, uid=CLIENT_UID) == "mesh"


# ---- the proxy run as the wrong uid ---------------------------------------------------------


@pytest.mark.root
def test_proxy_not_exempt_reports_a_pass_through_loop(pod: PodSandbox) -> None:
    pod.stop_proxy()
    wrong = pod.start_proxy(uid=CLIENT_UID)
    deadline = time.monotonic() + 5
    while not any(e["message"] == "pass-through loop detected at start-up"
                  for e in wrong.log_entries()):
        assert time.monotonic() < deadline, "no start-up loop error in the proxy's log"
        time.sleep(0.05)
    (startup,) = [e for e in wrong.log_entries()
                  if e["message"] == "pass-through loop detected at start-up"]
    assert startup["level"] == "error"
    assert "PROXY_UID" in startup["error"]
    before = len(pod.imds_records())

    started = time.monotonic()
    got = pod.curl(INSTANCE_URL)
    assert time.monotonic() - started < 5
    assert got.status == 508, got
    doc = got.json()
    assert doc["error"] == "loop_detected"
    assert "loop" in doc["error_description"] and "PROXY_UID" in doc["error_description"]

    assert wrong.running() and pod.readyz() == 200
    assert pod.imds_records()[before:] == []
    # One answer to the app and one to the proxy's own looped request: no recursion. The
    # access log is written an event-loop turn after the answer, so wait for both lines.
    def answered() -> list[int]:
        return [e["status"] for e in wrong.log_entries()
                if str(e.get("uri", "")).startswith("/metadata/instance")]

    deadline = time.monotonic() + 5
    while len(answered()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answered() == [508, 508]
