"""What IMDS would refuse, the live proxy refuses: request lines, pass-through targets, added headers.

Name: test_refusals
Scope: one proxy process (uid 1501) for the module, with a metrics port, in front of the
    fake Entra (which records every exchange) and the fake IMDS (which records every
    request it receives, headers and body as they arrived).
Depends: support.fixtures, support.metrics.

Issue 16, holes 1-3, each as CONTRACT.md words it:
1. only HTTP/1.0 and HTTP/1.1 are answered: a request line without a version (the HTTP/0.9
   shape that a CRLF injected into an app's URL produces) or with another version is a 400
   and a closed connection, never a token or an exchange;
2. only an origin-form target none of whose segments, decoded and cleaned, begins with
   `identity` is passed through; everything else is IMDS-style 404 JSON, never forwarded,
   and counted;
3. a forwarded request carries the client's own headers (hop-by-hop ones removed) and
   nothing added but the loop marker; the answer's body is relayed unchanged.
The expectations here are literal requests and literal records, not a second reading of
the product's rules (tests/test_hostile.py holds the property tests with their own judges).
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.fake_entra import FakeEntraClient
from support.fake_imds import INSTANCE, FakeImdsClient
from support.metrics import labelled, scrape
from support.proxyproc import (
    ImdsHandle,
    ProxyProcess,
    RawConnection,
    free_port,
    token_target,
    unique_resource,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)

LOOP_MARKER = "x-azwi-netproxy-loop"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def refusing_proxy(module_proxy_factory: Callable[..., ProxyProcess], fake_imds_server: ImdsHandle,
                   metrics_port: int) -> ProxyProcess:
    """Name: refusing_proxy. Scope: module. The pod's proxy (-OO, as the image runs it) with
    pass-through on (upstream's default) and metrics on `metrics_port`."""
    def checks() -> int:
        return sum(r["path"] == "/metadata/versions" for r in fake_imds_server.client.records())

    before = checks()
    proxy = module_proxy_factory(args=[f"--metrics-port={metrics_port}"], PYTHONOPTIMIZE="2")
    # Its start-up pass-through check reaches the fake IMDS in the background, after /readyz
    # answers: waited for here, or it may land in the first test's record of IMDS.
    deadline = time.monotonic() + 10
    while checks() == before:
        assert time.monotonic() < deadline, "the proxy's start-up check never reached the fake IMDS"
        time.sleep(0.05)
    return proxy


def exchange(proxy: ProxyProcess, raw: bytes) -> tuple[Any, bool]:
    """Send `raw` on a new connection: (the one answer, whether the proxy closed after it)."""
    with RawConnection(proxy.port, timeout_s=10) as connection:
        connection.send(raw)
        answer = connection.read_response()
        return answer, connection.at_eof(timeout_s=3)


# ---- 1. the HTTP version ------------------------------------------------------------------

def _token_line(resource: str) -> bytes:
    return f"GET {token_target(resource)}".encode()


VERSIONS = [
    # What an app's HTTP client sends when its URL carries "...&resource=x\r\nMetadata: true\r\n":
    # a request line without a version, then header lines. httptools reads it as HTTP/0.9.
    pytest.param(b"", id="no-version-then-headers"),
    pytest.param(b" HTTP/0.9", id="http-0.9"),
    pytest.param(b" HTTP/2.0", id="http-2.0"),
    pytest.param(b" HTTP/1.2", id="http-1.2"),
    pytest.param(b" HTTP/3.0", id="http-3.0"),
]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_request_line_with_no_or_another_version_gets_400_and_a_close(
        refusing_proxy: ProxyProcess, entra: FakeEntraClient, imds: FakeImdsClient, version: bytes) -> None:
    resource = unique_resource("version")
    raw = _token_line(resource) + version + b"\r\nMetadata: true\r\nHost: 169.254.169.254\r\n\r\n"
    answer, closed = exchange(refusing_proxy, raw)
    assert answer.status == 400, answer
    assert answer.json()["error"] == "invalid_request", answer
    assert "access_token" not in answer.body.decode()
    assert closed, "the connection must be closed after the 400"
    assert entra.exchanges() == [], "no exchange for a request IMDS refuses"
    assert imds.records() == []


def test_http_1_0_and_1_1_still_get_tokens(refusing_proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    """The control: the same request with a version IMDS answers gets the token."""
    for version in (b" HTTP/1.0", b" HTTP/1.1"):
        resource = unique_resource("version")
        answer, _ = exchange(refusing_proxy, _token_line(resource) + version
                             + b"\r\nMetadata: true\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        assert answer.status == 200, answer
        assert answer.json()["resource"] == resource
    assert len(entra.exchanges()) == 2


# RFC 9112, section 3.2, as Go's server (upstream's) answers it: an HTTP/1.1 request needs
# exactly one Host header, any request at most one. A request without its one Host is refused
# like a request line IMDS would not answer: 400, closed, never a token, an exchange or a
# pass-through.
HOSTS = [
    pytest.param(b" HTTP/1.1", b"", id="http-1.1-without-host"),
    pytest.param(b" HTTP/1.1", b"Host: 169.254.169.254\r\nHost: 169.254.169.254\r\n", id="http-1.1-two-hosts"),
    pytest.param(b" HTTP/1.0", b"Host: 169.254.169.254\r\nHost: 169.254.169.254\r\n", id="http-1.0-two-hosts"),
]


@pytest.mark.parametrize(("version", "hosts"), HOSTS)
def test_a_request_without_exactly_one_host_gets_400_and_a_close(
        refusing_proxy: ProxyProcess, entra: FakeEntraClient, imds: FakeImdsClient,
        version: bytes, hosts: bytes) -> None:
    for line in (_token_line(unique_resource("host")), b"GET /metadata/instance?api-version=2021-02-01"):
        answer, closed = exchange(refusing_proxy, line + version + b"\r\nMetadata: true\r\n" + hosts + b"\r\n")
        assert answer.status == 400, (line, answer)
        assert answer.json()["error"] == "invalid_request", answer
        assert "access_token" not in answer.body.decode()
        assert closed, "the connection must be closed after the 400"
    assert entra.exchanges() == [], "no exchange for a request without its one Host"
    assert imds.records() == [], "no pass-through for a request without its one Host"


def test_http_1_0_without_host_still_gets_its_token(refusing_proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    """The control: HTTP/1.0 has no Host requirement."""
    resource = unique_resource("host")
    answer, _ = exchange(refusing_proxy, _token_line(resource) + b" HTTP/1.0\r\nMetadata: true\r\n\r\n")
    assert answer.status == 200, answer
    assert answer.json()["resource"] == resource
    assert len(entra.exchanges()) == 1


# ---- 2. pass-through targets ---------------------------------------------------------------

TOKEN_QUERY = "?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
REFUSED_TARGETS = [
    # A network-path reference: urljoin and WHATWG URL read its path as the token path.
    pytest.param("//host/metadata/identity/oauth2/token" + TOKEN_QUERY, id="network-path"),
    pytest.param("//169.254.169.254/metadata/identity/oauth2/token" + TOKEN_QUERY, id="network-path-imds"),
    pytest.param("//metadata/instance?api-version=2021-02-01", id="network-path-instance"),
    pytest.param("http://169.254.169.254/metadata/instance?api-version=2021-02-01", id="absolute-form"),
    pytest.param("/metadata/identity;x/oauth2/token" + TOKEN_QUERY, id="semicolon-parameter"),
    pytest.param("/metadata./identity/oauth2/token" + TOKEN_QUERY, id="trailing-dot-on-metadata"),
    pytest.param("/metadata/identity%00/oauth2/token" + TOKEN_QUERY, id="nul"),
    pytest.param("/metadata/identity%20/oauth2/token" + TOKEN_QUERY, id="space"),
    pytest.param("/metadata/identity./oauth2/token" + TOKEN_QUERY, id="trailing-dot"),
    pytest.param("/metadata/identity%09/oauth2/token" + TOKEN_QUERY, id="tab"),
    pytest.param("/metadata/identity%7F/oauth2/token" + TOKEN_QUERY, id="del"),
    pytest.param("/metadata/%01identity/oauth2/token" + TOKEN_QUERY, id="leading-control-byte"),
    pytest.param("/metadta/identity/oauth2/token" + TOKEN_QUERY, id="misspelt-metadata"),
    pytest.param("/metadata/identityoauth2/token" + TOKEN_QUERY, id="identity-prefix"),
    pytest.param("/metadata/IDENTITY/oauth2/token" + TOKEN_QUERY, id="upper-case"),
    pytest.param("/metadata/%69dentity/oauth2/token" + TOKEN_QUERY, id="percent-encoded-letter"),
    pytest.param("/metadata/%2569dentity/oauth2/token" + TOKEN_QUERY, id="double-encoded"),
    pytest.param("/metadata/instance/..%2f..%2fmetadata/identity/oauth2/token" + TOKEN_QUERY, id="encoded-dots"),
    pytest.param("/metadata/instance%5c..%5cidentity/oauth2/token" + TOKEN_QUERY, id="backslashes"),
    pytest.param("/identity/oauth2/token" + TOKEN_QUERY, id="no-metadata-prefix"),
    pytest.param("/metadata/identity" , id="identity-alone"),
]


@pytest.mark.parametrize("target", REFUSED_TARGETS)
def test_targets_that_may_name_the_identity_endpoint_are_404_and_never_forwarded(
        refusing_proxy: ProxyProcess, entra: FakeEntraClient, imds: FakeImdsClient, metrics_port: int,
        target: str) -> None:
    refused_before = sum(labelled(scrape(metrics_port), "azwi_netproxy_passthrough_refused_total").values())
    raw = f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    answer, _ = exchange(refusing_proxy, raw.encode())
    assert answer.status == 404, answer
    body = answer.json()
    assert set(body) == {"error", "error_description"}, body
    assert imds.records() == [], "never forwarded to the node's IMDS"
    assert entra.exchanges() == []
    refused_after = sum(labelled(scrape(metrics_port), "azwi_netproxy_passthrough_refused_total").values())
    assert refused_after == refused_before + 1


ORIGIN_FORM_PASSED = [
    pytest.param("/metadata/instance?api-version=2021-02-01", id="instance"),
    pytest.param("/metadata/instance/compute?api-version=2021-02-01&format=json", id="instance-compute"),
    pytest.param("/metadata/versions", id="versions"),
    pytest.param("/metadata/attested/document?api-version=2020-09-01", id="attested"),
    pytest.param("/metadata/scheduledevents?api-version=2020-07-01", id="scheduled-events"),
]


@pytest.mark.parametrize("target", ORIGIN_FORM_PASSED)
def test_other_origin_form_targets_are_still_forwarded_verbatim(
        refusing_proxy: ProxyProcess, imds: FakeImdsClient, target: str) -> None:
    raw = f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    exchange(refusing_proxy, raw.encode())
    records = imds.records()
    assert [r["target"] for r in records] == [target]


# ---- 3. what a forwarded request carries -----------------------------------------------------

def _headers_of(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in record["headers"]]


def test_a_forwarded_request_carries_the_clients_headers_and_only_the_loop_marker(
        refusing_proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    raw = (b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\n"
           b"Host: 169.254.169.254\r\n"
           b"Metadata: true\r\n"
           b"User-Agent: legacy-app/1.0\r\n"
           b"X-Request-Id: 1234\r\n"
           b"Connection: keep-alive, X-Hop\r\n"
           b"Keep-Alive: timeout=5\r\n"
           b"X-Hop: named-in-connection\r\n"
           b"Proxy-Authorization: Basic c2VjcmV0\r\n"
           b"TE: trailers\r\n"
           b"\r\n")
    answer, _ = exchange(refusing_proxy, raw)
    assert answer.status == 200, answer
    assert answer.json() == INSTANCE
    (record,) = imds.records()
    received = _headers_of(record)
    # Host names the destination, as upstream sets it (in a pod the same 169.254.169.254
    # the client sent; here the stand-in's loopback address).
    assert [(n, v) for n, v in received if n != LOOP_MARKER] == [
        ("host", f"{imds.host}:{imds.port}"),
        ("metadata", "true"),
        ("user-agent", "legacy-app/1.0"),
        ("x-request-id", "1234"),
    ], received
    assert [n for n, _ in received].count(LOOP_MARKER) == 1


def test_no_compression_is_asked_for_a_client_that_did_not_ask(
        refusing_proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    raw = (b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"Metadata: true\r\nConnection: close\r\n\r\n")
    answer, _ = exchange(refusing_proxy, raw)
    assert "content-encoding" not in answer.headers, answer
    assert json.loads(answer.body) == INSTANCE
    (record,) = imds.records()
    assert not {"accept-encoding", "accept"} & {n for n, _ in _headers_of(record)}, record


def test_a_compressed_answer_the_client_asked_for_is_relayed_byte_for_byte(
        refusing_proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    raw = (b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"Metadata: true\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
    answer, _ = exchange(refusing_proxy, raw)
    assert answer.status == 200, answer
    assert answer.headers["content-encoding"] == "gzip"
    # The stand-in's own bytes: gzip of its JSON with mtime 0, as it sent them.
    assert answer.body == gzip.compress(json.dumps(INSTANCE).encode(), mtime=0)
    (record,) = imds.records()
    assert ("accept-encoding", "gzip") in _headers_of(record)


def test_a_request_body_is_forwarded_unchanged(refusing_proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    body = b'{"DocumentIncarnation": 3, "StartRequests": [{"EventId": "a\\u00e9"}]}'
    raw = (b"POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"Metadata: true\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
           b"Connection: close\r\n\r\n" % len(body)) + body
    exchange(refusing_proxy, raw)
    (record,) = imds.records()
    assert record["method"] == "POST"
    assert record["body"].encode() == body
    assert [(n, v) for n, v in _headers_of(record) if n != LOOP_MARKER] == [
        ("host", f"{imds.host}:{imds.port}"),
        ("metadata", "true"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
