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

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support import netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import REFERENCE_PLUGINS
from support.fake_entra import decode_fake_token
from support.nodemode import (
    INSTANCE_URL,
    LAYOUT_OLD,
    METADATA_IP,
    TOKEN_URL,
    NodeMode,
    NodePod,
    fds_naming,
    netns_link,
    node_mode,
)
from support.proxyproc import new_guid

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


def _token_of(got: object) -> dict[str, object]:
    doc = json.loads(got.body)  # type: ignore[attr-defined]
    return decode_fake_token(doc["access_token"])


def test_each_pod_gets_the_token_of_its_own_service_account(two_pods: TwoPods) -> None:
    t = two_pods
    got_a, got_b = t.a.curl(), t.b.curl()
    assert got_a.status == 200, f"{got_a}\n{t.mode.node_log()[-3000:]}"
    assert got_b.status == 200, got_b
    # Entra minted each token for the assertion it was shown: A's for C1, B's for C2.
    claims_a, claims_b = _token_of(got_a), _token_of(got_b)
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
