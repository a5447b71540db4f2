"""passthrough.forwardable: which headers may cross the proxy to the real IMDS (and back).

Name: test_passthrough_headers
Scope: pure unit tests of the header filter and the loop marker.
Depends: azwi_netproxy.proxy.passthrough (no client is built: no I/O).
"""

from __future__ import annotations

import pytest

from azwi_netproxy.proxy.passthrough import LOOP_DETECTED, LOOP_HEADER, Passthrough, forwardable
from azwi_netproxy.proxy.wire import Request

H = list[tuple[bytes, bytes]]

CASES: list[tuple[H, H, str]] = [
    (
        [(b"metadata", b"true"), (b"accept", b"*/*"), (b"user-agent", b"sdk/1")],
        [(b"metadata", b"true"), (b"accept", b"*/*"), (b"user-agent", b"sdk/1")],
        "ordinary-headers-kept-in-order",
    ),
    (
        [
            (b"host", b"169.254.169.254"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-authenticate", b"Basic"),
            (b"proxy-connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"trailer", b"x"),
            (b"trailers", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"content-length", b"0"),
            (b"metadata", b"true"),
        ],
        [(b"metadata", b"true")],
        "hop-by-hop-and-host-dropped",
    ),
    (
        [(b"x-forwarded-for", b"10.0.0.1"), (b"metadata", b"true"), (b"x-forwarded-for", b"10.0.0.2")],
        [(b"metadata", b"true")],
        "x-forwarded-for-dropped",
    ),
    (
        [(b"connection", b"close, X-Secret ,x-other"), (b"x-secret", b"s"), (b"x-other", b"o"), (b"x-kept", b"k")],
        [(b"x-kept", b"k")],
        "headers-named-in-connection-dropped",
    ),
    (
        [(b"connection", b"X-A"), (b"connection", b"x-b"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")],
        [(b"x-c", b"3")],
        "several-connection-headers",
    ),
    (
        [(b"Host", b"h"), (b"X-Forwarded-For", b"1.2.3.4"), (b"Transfer-Encoding", b"chunked"),
         (b"Content-Type", b"application/json")],
        [(b"Content-Type", b"application/json")],
        "mixed-case-hop-by-hop-names",
    ),
    ([(LOOP_HEADER, b"nonce")], [], "our-loop-marker-never-forwarded"),
    ([], [], "empty"),
]


@pytest.mark.parametrize(
    ("headers", "kept"),
    [(h, k) for h, k, _ in CASES],
    ids=[name for *_, name in CASES],
)
def test_forwardable(headers: H, kept: H) -> None:
    assert forwardable(headers) == kept


def test_forwardable_does_not_modify_its_input() -> None:
    headers = [(b"host", b"h"), (b"metadata", b"true")]
    forwardable(headers)
    assert headers == [(b"host", b"h"), (b"metadata", b"true")]


def test_loop_marker_matches_only_this_process_nonce() -> None:
    passthrough = Passthrough("169.254.169.254", 80, run_as_uid=1501)
    other = Passthrough("169.254.169.254", 80, run_as_uid=1501)
    assert passthrough.nonce != other.nonce
    ours = Request("GET", b"/metadata/instance", "1.1", [(LOOP_HEADER, passthrough.nonce)])
    theirs = Request("GET", b"/metadata/instance", "1.1", [(LOOP_HEADER, other.nonce)])
    detected = Request("GET", b"/metadata/instance", "1.1", [(LOOP_HEADER, LOOP_DETECTED)])
    plain = Request("GET", b"/metadata/instance", "1.1", [(b"metadata", b"true")])
    assert passthrough.is_own_loop(ours)
    assert not passthrough.is_own_loop(theirs)
    assert not passthrough.is_own_loop(detected)
    assert not passthrough.is_own_loop(plain)

