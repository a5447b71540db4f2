"""Sans-IO HTTP/1.1: the request reader around httptools and the response serializer.

Name: test_wire
Scope: pure unit tests, bytes in and out, no sockets.
Depends: azwi_netproxy.proxy.wire only.
"""

from __future__ import annotations

import pytest

from azwi_netproxy.errors import MalformedRequest
from azwi_netproxy.proxy import wire
from azwi_netproxy.proxy.wire import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_TARGET_BYTES,
    DateHeader,
    RequestReader,
    Response,
    serialize,
)

TOKEN_GET = (
    b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\n"
    b"Host: 169.254.169.254\r\n"
    b"Metadata: true\r\n"
    b"X-Custom: One\r\n"
    b"\r\n"
)
READY_GET = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
HTTP10_GET = b"GET /readyz HTTP/1.0\r\n\r\n"
HTTP10_KEEPALIVE_GET = b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
CLOSE_GET = b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
POST_BODY = b"POST /metadata/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_POST = b"POST /x HTTP/1.1\r\nHost: 169.254.169.254\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"


def test_one_request() -> None:
    [request] = RequestReader().feed(TOKEN_GET)
    assert request.method == "GET"
    assert request.target.startswith(b"/metadata/identity/oauth2/token?api-version=2018-02-01")
    assert request.http_version == "1.1"
    assert request.keep_alive is True
    assert request.body == b""


def test_header_names_are_lowercased_values_and_order_kept() -> None:
    [request] = RequestReader().feed(TOKEN_GET)
    assert request.headers == [
        (b"host", b"169.254.169.254"),
        (b"metadata", b"true"),
        (b"x-custom", b"One"),
    ]
    assert request.header_values(b"metadata") == [b"true"]
    assert request.header_values(b"absent") == []


def test_repeated_headers_are_all_kept() -> None:
    data = b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nmetadata: false\r\n\r\n"
    [request] = RequestReader().feed(data)
    assert request.header_values(b"metadata") == [b"true", b"false"]


def test_pipelined_requests_in_one_feed_come_out_in_order() -> None:
    reader = RequestReader()
    requests = reader.feed(READY_GET + TOKEN_GET + CLOSE_GET)
    assert [r.target[:8] for r in requests] == [b"/readyz", b"/metadat", b"/readyz"]
    assert [r.keep_alive for r in requests] == [True, True, False]
    assert reader.reading_request is False


def test_byte_by_byte_feed() -> None:
    reader = RequestReader()
    done = []
    for i in range(len(TOKEN_GET)):
        done += reader.feed(TOKEN_GET[i : i + 1])
        if i < len(TOKEN_GET) - 1:
            assert reader.reading_request is True
            assert done == []
    [request] = done
    assert request.headers[1] == (b"metadata", b"true")
    assert reader.reading_request is False


def test_reading_request_tracks_a_partial_request() -> None:
    reader = RequestReader()
    assert reader.reading_request is False
    assert reader.feed(READY_GET + b"GET /next HT") != []
    assert reader.reading_request is True
    [request] = reader.feed(b"TP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    assert request.target == b"/next"
    assert reader.reading_request is False


KEEP_ALIVE_CASES = [
    (READY_GET, "1.1", True, "http11-default"),
    (CLOSE_GET, "1.1", False, "http11-connection-close"),
    (HTTP10_GET, "1.0", False, "http10-default-close"),
    (HTTP10_KEEPALIVE_GET, "1.0", True, "http10-keep-alive"),
]


@pytest.mark.parametrize(
    ("data", "version", "keep_alive"),
    [(d, v, k) for d, v, k, _ in KEEP_ALIVE_CASES],
    ids=[name for *_, name in KEEP_ALIVE_CASES],
)
def test_keep_alive(data: bytes, version: str, keep_alive: bool) -> None:
    [request] = RequestReader().feed(data)
    assert request.http_version == version
    assert request.keep_alive is keep_alive


@pytest.mark.parametrize("data", [POST_BODY, CHUNKED_POST], ids=["content-length", "chunked"])
def test_body(data: bytes) -> None:
    [request] = RequestReader().feed(data)
    assert request.method == "POST"
    assert request.body in (b"hello", b"abcde")


def _huge_header_block(count: int, value_len: int) -> bytes:
    return b"".join(b"X-H%d: %s\r\n" % (i, b"v" * value_len) for i in range(count))


ERROR_CASES = [
    (b"GET /" + b"a" * MAX_TARGET_BYTES + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 414, "target-too-long"),
    (b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n" + _huge_header_block(4, MAX_HEADER_BYTES // 3) + b"\r\n", 431, "header-bytes"),
    # Many tiny headers are bounded too (each costs bookkeeping beyond its bytes).
    (b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n" + _huge_header_block(1000, 1) + b"\r\n", 431, "header-count"),
    (
        b"POST / HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1) + b"x" * (MAX_BODY_BYTES + 1),
        413,
        "body-too-large",
    ),
    (b"FOO / HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 400, "invalid-method"),
    (b"\x16\x03\x01\x00\xa5\x01\x00", 400, "tls-client-hello"),
    (b"GET / HTTP/1.1\r\nHost: a\nb\r\n\r\n", 400, "bare-lf-in-header"),
    (b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nX: \x01\r\n\r\n", 400, "control-char-in-header"),
    (b"GET  HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 400, "missing-target"),
    (b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: abc\r\n\r\n", 400, "bad-content-length"),
    (b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "cl-and-te"),
    (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400, "upgrade"),
    (b"CONNECT host:443 HTTP/1.1\r\n\r\n", 400, "connect"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "h2-preface"),
    (b"GET /x RTSP/1.0\r\nHost: h\r\n\r\n", 400, "rtsp"),
    (b"GET /metadata/identity/oauth2/token?api-version=1&resource=x\r\nMetadata: true\r\nHost: h\r\n\r\n",
     400, "no-version-with-headers"),
    (b"GET /x HTTP/2.0\r\nHost: h\r\n\r\n", 400, "http-2.0"),
    (b"GET /x HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n", 400, "two-hosts"),
    (b"GET /x HTTP/1.1\r\n\r\n", 400, "http11-without-host"),
]


@pytest.mark.parametrize(
    ("data", "status"),
    [(d, s) for d, s, _ in ERROR_CASES],
    ids=[name for *_, name in ERROR_CASES],
)
def test_protocol_errors(data: bytes, status: int) -> None:
    with pytest.raises(MalformedRequest) as info:
        RequestReader().feed(data)
    assert info.value.status == status


def test_target_limit_counts_across_feeds() -> None:
    reader = RequestReader()
    reader.feed(b"GET /" + b"a" * (MAX_TARGET_BYTES // 2))
    with pytest.raises(MalformedRequest) as info:
        reader.feed(b"a" * (MAX_TARGET_BYTES // 2 + 1) + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    assert info.value.status == 414


def test_target_at_the_limit_is_accepted() -> None:
    target = b"/" + b"a" * (MAX_TARGET_BYTES - 1)
    [request] = RequestReader().feed(b"GET " + target + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    assert request.target == target


def test_many_ordinary_headers_are_accepted() -> None:
    [request] = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n" + _huge_header_block(60, 20) + b"\r\n")
    assert len(request.headers) == 61  # Host and the 60


def test_bytes_that_look_like_a_request_in_the_middle_of_one_are_not_a_request() -> None:
    reader = RequestReader()
    assert reader.feed(b"GET /first HTTP/1.1\r\nX-A: ") == []
    [request] = reader.feed(READY_GET)  # here it is the rest of /first's header block
    assert request.target == b"/first"
    assert request.headers[0] == (b"x-a", b"GET /readyz HTTP/1.1")


# ---- serializer -------------------------------------------------------------------------

DATE = b"Tue, 14 Nov 2023 22:13:20 GMT"


def _split(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    return status, headers, body


def test_serialize_keep_alive() -> None:
    raw = serialize(Response(200, b'{"a":1}'), date=DATE, head=False, keep_alive=True)
    status, headers, body = _split(raw)
    assert status == b"HTTP/1.1 200 OK"
    assert headers == {
        b"Content-Type": b"application/json; charset=utf-8",
        b"Content-Length": b"7",
        b"Date": DATE,
        b"Server": b"azwi-netproxy",
    }
    assert body == b'{"a":1}'


def test_serialize_close_and_extra_headers() -> None:
    response = Response(429, b"slow down", b"text/plain", [(b"Retry-After", b"5")])
    status, headers, body = _split(serialize(response, date=DATE, head=False, keep_alive=False))
    assert status == b"HTTP/1.1 429 Too Many Requests"
    assert headers[b"Retry-After"] == b"5"
    assert headers[b"Connection"] == b"close"
    assert headers[b"Content-Type"] == b"text/plain"
    assert body == b"slow down"


def test_serialize_head_keeps_length_drops_body() -> None:
    raw = serialize(Response(200, b"0123456789"), date=DATE, head=True, keep_alive=True)
    _, headers, body = _split(raw)
    assert headers[b"Content-Length"] == b"10"
    assert body == b""
    assert raw.endswith(b"\r\n\r\n")


def test_serialize_http10_keep_alive_says_so() -> None:
    _, headers, _ = _split(
        serialize(Response(200, b"ok"), date=DATE, head=False, keep_alive=True, http10_keep_alive=True)
    )
    assert headers[b"Connection"] == b"keep-alive"


STATUS_LINES = [
    (400, b"HTTP/1.1 400 Bad Request"),
    (404, b"HTTP/1.1 404 Not Found"),
    (405, b"HTTP/1.1 405 Method Not Allowed"),
    (414, b"HTTP/1.1 414 Request-URI Too Long"),
    (431, b"HTTP/1.1 431 Request Header Fields Too Large"),
    (503, b"HTTP/1.1 503 Service Unavailable"),
    (508, b"HTTP/1.1 508 Loop Detected"),
    (599, b"HTTP/1.1 599 Unknown"),
]


@pytest.mark.parametrize(("status", "line"), STATUS_LINES, ids=[str(s) for s, _ in STATUS_LINES])
def test_status_lines(status: int, line: bytes) -> None:
    raw = serialize(Response(status), date=DATE, head=False, keep_alive=True)
    assert raw.split(b"\r\n", 1)[0] == line


def test_date_header_formats_and_caches_per_second() -> None:
    date = DateHeader()
    first = date.value(1_700_000_000.1)
    assert first == DATE
    assert date.value(1_700_000_000.9) is first
    assert date.value(1_700_000_001.0) == b"Tue, 14 Nov 2023 22:13:21 GMT"


def test_limits_are_the_documented_ones() -> None:
    assert (wire.MAX_TARGET_BYTES, wire.MAX_HEADER_BYTES) == (8 * 1024, 16 * 1024)


def test_a_request_line_naming_rtsp_split_across_feeds_is_refused() -> None:
    reader = RequestReader()
    assert reader.feed(b"GET /readyz HTTP/1.1\r\nHost: h\r\n\r\nGET /metadata/instance RT") != []
    with pytest.raises(MalformedRequest) as info:
        reader.feed(b"SP/1.0\r\nHost: h\r\n\r\n")
    assert info.value.status == 400


def test_http10_without_host_is_still_answered() -> None:
    [request] = RequestReader().feed(b"GET /readyz HTTP/1.0\r\n\r\n")
    assert request.http_version == "1.0"
