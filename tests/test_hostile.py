"""Hostile and broken clients against the live proxy: random bytes, mangled requests, slow clients.

Name: test_hostile
Scope: one proxy process (uid 1501) for the module, with METADATA_IP:METADATA_PORT aimed at
    a loopback fake IMDS that records every request, and a second fake IMDS (the "decoy")
    that only ever appears in the requests' own Host headers and absolute-form targets: if
    pass-through could be steered, the decoy (or the fake Entra) would record it. Timeout
    and connection-bound tests that need short limits run an HttpServer in-process, as
    tests/test_server.py does.
Depends: support.fixtures (proxy, fakes), hypothesis.

What is asserted is issue 7, "Hostile or broken clients": whatever arrives, the proxy
answers with well-formed HTTP or closes, never crashes, never hands out a token for a
request IMDS would refuse, and passes through only to METADATA_IP:METADATA_PORT; slow and
idle clients are cut; connections are bounded; pipelined answers keep their order; the
token path answers GET only (CONTRACT.md: 405 for every other method, HEAD included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.fake_entra import FakeEntraClient, decode_fake_token
from support.fake_imds import NODE_TOKEN_MARK, FakeImdsClient
from support.proxyproc import (
    TOKEN_PATH,
    Pod,
    ProxyProcess,
    RawConnection,
    http_request,
    start_fake_imds,
    token_target,
    unique_resource,
)

from azwi_netproxy.http11 import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_TARGET_BYTES, Request, Response
from azwi_netproxy.server import HttpServer, ServerLimits

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(120)

# Bounded runs, no example database in the repository, fixtures shared by all examples
# (the fakes are reset once per test, which is what these properties need).
HOSTILE = settings(
    max_examples=250,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

TOKEN_TAILS = ("/identity/oauth2/token", "/identity/oauth2/token/")


# ---- fixtures ---------------------------------------------------------------------------


@dataclass
class Decoy:
    """A second fake IMDS: the address hostile requests try to steer pass-through to."""

    client: FakeImdsClient
    authority: str


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Decoy]:
    """Name: decoy. Scope: module. A fake IMDS nobody should ever reach through the proxy."""
    process = start_fake_imds(tmp_path_factory.mktemp("decoy") / "decoy.log")
    try:
        client = FakeImdsClient(process.url)
        yield Decoy(client, f"{client.host}:{client.port}")
    finally:
        process.stop()


@pytest.fixture
def quiet_decoy(decoy: Decoy) -> Decoy:
    decoy.client.reset()
    return decoy


# ---- talking raw HTTP -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    answers: list[Answer]
    closed: bool  # the server closed (FIN or RST) before our read deadline
    reset: bool
    raw: bytes = field(repr=False, default=b"")


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [\x20-\x7e]*")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([\x20-\x7e\x80-\xff]*)")


def parse_answers(data: bytes, *, head: bool = False) -> list[Answer]:
    """Every response in `data`, insisting that each is well-formed HTTP/1.1 with a
    Content-Length and that nothing but whole responses was sent.

    With `head`, a body is expected only on a last answer that carries exactly
    Content-Length bytes: the 400 for a malformed HEAD request has one (and closes).
    """
    answers = []
    rest = data
    while rest:
        block, sep, after = rest.partition(b"\r\n\r\n")
        assert sep, f"truncated response head: {rest[:300]!r}"
        status_line, *lines = block.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        assert match, f"bad status line {status_line!r}"
        headers: dict[str, list[str]] = {}
        for line in lines:
            header = _HEADER_LINE.fullmatch(line)
            assert header, f"bad header line {line!r} in {block!r}"
            headers.setdefault(header[1].decode().lower(), []).append(header[2].decode("latin-1"))
        lengths = headers.get("content-length", [])
        assert len(lengths) == 1 and lengths[0].isdigit(), f"no single Content-Length: {block!r}"
        length = int(lengths[0])
        if head and len(after) != length:
            length = 0
        assert len(after) >= length, f"body shorter than Content-Length: {block!r}"
        answers.append(Answer(int(match[1]), headers, after[:length]))
        rest = after[length:]
    return answers


def talk(port: int, data: bytes, *, half_close: bool, head: bool = False,
         timeout_s: float = 15.0) -> Exchange:
    """Send `data`, optionally shut our side, read until the server closes or timeout_s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    received = b""
    reset = closed = False
    try:
        with contextlib.suppress(OSError):
            # The server may answer (431, 413) and close before it has read everything.
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                reset = closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return Exchange(parse_answers(received, head=head), closed, reset, received)


def assert_imds_error_shape(answer: Answer) -> None:
    """The proxy's own errors are IMDS-style JSON with two string fields."""
    doc = answer.json()
    assert set(doc) == {"error", "error_description"}, doc
    assert all(isinstance(v, str) and v for v in doc.values()), doc


def assert_alive(proxy: ProxyProcess) -> None:
    assert proxy.proc.poll() is None, proxy.log_text()[-3000:]
    assert http_request(proxy.port, "/readyz", timeout_s=5).status == 200


# ---- an oracle for "may this request get a token?" (independent of the proxy's code) ----


@dataclass
class Sent:
    method: str
    target: str
    headers: list[tuple[str, str]]


def naive_parse(data: bytes) -> Sent | None:
    """The request as a line-oriented reader sees it: request line, then header lines."""
    text = data.decode("latin-1")
    if "\r\n" not in text:
        return None
    line, _, rest = text.partition("\r\n")
    parts = line.split(" ")
    if len(parts) < 2:
        return None
    headers = []
    for header in rest.split("\r\n\r\n", 1)[0].split("\r\n"):
        name, colon, value = header.partition(":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    return Sent(parts[0], parts[1], headers)


def token_path_of(target: str) -> str | None:
    """The path if the target names the token endpoint exactly as IMDS matches it."""
    target = target.partition("#")[0]
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target):
        after_scheme = target.split("://", 1)[1]
        slash = after_scheme.find("/")
        target = after_scheme[slash:] if slash >= 0 else "/"
    path = target.partition("?")[0]
    if path[:9].lower() == "/metadata" and path[9:] in TOKEN_TAILS:
        return path
    return None


def may_get_token(sent: Sent | None) -> bool:
    if sent is None or sent.method != "GET" or token_path_of(sent.target) is None:
        return False
    metadata = [value for name, value in sent.headers if name == "metadata"]
    forwarded = any(name == "x-forwarded-for" for name, _ in sent.headers)
    return len(metadata) == 1 and metadata[0].lower() == "true" and not forwarded


def identity_like(path: str) -> bool:
    """Could any lenient server read `path` as the identity endpoint? (our own reading)"""
    decoded = path
    for _ in range(5):
        decoded = urllib.parse.unquote(decoded, errors="replace")
    decoded = decoded.replace("\\", "/")
    folded = posixpath.normpath("/" + decoded.lstrip("/")).lower()
    return folded.startswith("/metadata/identity")


def check_upstreams(imds: FakeImdsClient, decoy: Decoy, entra: FakeEntraClient) -> None:
    """Pass-through reached only the fake IMDS (its Host header is the client's own, which
    IMDS ignores), never for identity paths; nothing reached the decoy; the fake Entra saw
    only token exchanges."""
    for record in imds.records():
        assert not identity_like(record["path"]), record
    assert decoy.client.records() == []
    for record in entra.records():
        assert record["method"] == "POST" and record["path"].endswith("/oauth2/v2.0/token"), record


# ---- strategies ---------------------------------------------------------------------------

LATIN1 = st.characters(codec="latin-1")
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)

METHODS = st.one_of(
    st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE",
                     "PATCH", "PROPFIND", "CONNECT", "PRI", "FOO", "get", "G\x00T", "GET\t",
                     "", "GET /x", "M-SEARCH"]),
    st.text(PRINTABLE, min_size=1, max_size=12),
)
PATHS = st.sampled_from([
    TOKEN_PATH, TOKEN_PATH + "/", "/METADATA/identity/oauth2/token", "/Metadata/identity/oauth2/token/",
    "/metadata/instance", "/metadata/instance/compute", "/metadata/%69dentity/oauth2/token",
    "//metadata/identity/oauth2/token", "/metadata/./identity/oauth2/token",
    "/a/../metadata/identity/oauth2/token", "/metadata/identity%2Foauth2%2Ftoken",
    "/metadata\\identity\\oauth2\\token", "/metadata/%2569dentity/oauth2/token",
    "/metadata/identity/oauth2/token/..", "/readyz", "/healthz", "/", "*", "",
    "/metadata/identity", "/metadata/IDENTITY/oauth2/token", "/%2e%2e/metadata/instance",
])
QUERY_NAMES = st.sampled_from(["api-version", "resource", "client_id", "object_id",
                               "principal_id", "msi_res_id", "mi_res_id", "bearer", "x"])
QUERY_VALUES = st.one_of(
    st.sampled_from([
        "2018-02-01", "https%3A%2F%2Fvault.azure.net", "https://management.azure.com/",
        "%", "%G1", "%0", "%zz", "%u0041", "%%", "%E2%82", "%C0%AF", "%FF", "%00", "%0d%0a",
        "x%0d%0aMetadata:%20true", "\r\nMetadata: true", "\r\nX-Forwarded-For: 10.0.0.1",
        "\r\n\r\nGET /metadata/instance HTTP/1.1", "\n", "\r", "\x00", "a b", "a\tb", "\u00e9",
        "", "%20", "+", "00000000-0000-0000-0000-000000000000",
    ]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="&#"), max_size=30),
    st.text(LATIN1, max_size=30),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "http/1.1",
                            "HTTP/0.9", "", "HTTP/1.1 extra", "HTTP/11"])
METADATA_HEADERS = st.lists(
    st.sampled_from(["true", "TRUE", "True", " true ", "false", "", "true, true", "1", "yes",
                     "tru", "true\x00"]),
    max_size=3,
)


def authority_prefixes(decoy: Decoy, entra_host: str) -> st.SearchStrategy[str]:
    """Absolute-form prefixes naming hosts other than METADATA_IP:METADATA_PORT."""
    return st.sampled_from([
        "", "", "", f"http://{decoy.authority}", f"HTTP://{decoy.authority}",
        f"https://{decoy.authority}", f"http://user@{decoy.authority}",
        f"http://{decoy.authority}@{decoy.authority}", f"http://{entra_host}",
        "http://169.254.169.254", "http://localhost:1", "http://[::1]:1", "http://[::1",
        "http://[x]", "http://a]", f"//{decoy.authority}", "http://other-host:99999",
        "http://%31%32%37.0.0.1:1", "http:/", "http:\\\\other-host",
    ])


def _mostly(draw: st.DrawFn, good: Any, bad: st.SearchStrategy[Any], bad_percent: int) -> Any:
    """`good` most of the time, else a draw from `bad`: hostile requests stay close enough
    to valid ones that they reach the token logic and pass-through, not only the parser."""
    return draw(bad) if draw(st.integers(0, 99)) < bad_percent else good


@st.composite
def hostile_requests(draw: st.DrawFn, decoy: Decoy, entra_host: str) -> tuple[bytes, bool, str]:
    """(bytes to send, whether they form a complete request, method) for one hostile request."""
    method = _mostly(draw, "GET", METHODS, 15)
    prefix = _mostly(draw, "", authority_prefixes(decoy, entra_host), 35)
    path = draw(st.sampled_from([TOKEN_PATH, TOKEN_PATH, "/metadata/instance"]) | PATHS)
    params = [("api-version", "2018-02-01"),
              ("resource", draw(st.sampled_from(["https://vault.azure.net",
                                                 "https%3A%2F%2Fmanagement.azure.com%2F",
                                                 f"https://h-{draw(st.uuids()).hex[:10]}.example.com/"])))]
    params = [pair for pair in params if draw(st.integers(0, 9)) != 0]
    params += _mostly(draw, [], st.lists(st.tuples(QUERY_NAMES, QUERY_VALUES), min_size=1, max_size=3), 30)
    draw(st.randoms()).shuffle(params)
    query = "&".join(f"{name}={value}" for name, value in params)
    target = prefix + path + (("?" + query) if query or draw(st.booleans()) else "")
    version = _mostly(draw, "HTTP/1.1", VERSIONS, 10)
    headers: list[tuple[str, str]] = [
        ("Metadata", value) for value in _mostly(draw, ["true"], METADATA_HEADERS, 20)]
    host = _mostly(draw, "169.254.169.254", st.sampled_from(
        [None, decoy.authority, entra_host, "", "a b", f"{decoy.authority}\r\nX-Injected: 1"]), 40)
    if host is not None:
        headers.append(("Host", host))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("X-Forwarded-For", "10.0.0.1"))
    headers += _mostly(draw, [], st.lists(st.tuples(
        st.sampled_from(["X-Forwarded-Host", "Forwarded", "X-Original-URL", "X-Rewrite-URL",
                         "Proxy-Connection", "Via", "Authorization", "Upgrade", "Expect"])
        | st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True)
        | st.text(PRINTABLE, min_size=1, max_size=10),
        st.sampled_from([decoy.authority, f"for=1.2.3.4;host={decoy.authority}",
                         "/metadata/identity/oauth2/token", "100-continue", "h2c"])
        | st.text(LATIN1, max_size=20)), min_size=1, max_size=3), 20)
    draw(st.randoms()).shuffle(headers)
    body = _mostly(draw, b"", st.sampled_from([b"x=1", b"\r\n\r\nGET / HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"]), 10)
    if body:
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}" if version else f"{method} {target}"
    lines = [head, *(f"{name}: {value}" for name, value in headers)]
    complete = draw(st.integers(0, 9)) < 8
    if complete:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    if not complete:
        data = data[: draw(st.integers(0, len(data)))]
    return data, complete, method


# ---- properties against the live server ---------------------------------------------------


def test_random_bytes_get_well_formed_answers_or_a_close(
        proxy: ProxyProcess, imds: FakeImdsClient, entra: FakeEntraClient,
        quiet_decoy: Decoy) -> None:
    @HOSTILE
    @given(data=st.binary(max_size=2048))
    def prop(data: bytes) -> None:
        exchange = talk(proxy.port, data, half_close=True)
        assert exchange.closed, f"not closed after a half-close: {exchange}"
        for answer in exchange.answers:
            assert not (answer.status == 500 and b"internal_error" in answer.body), (data, answer)
            assert NODE_TOKEN_MARK.encode() not in answer.body

    prop()
    # After every example: the same process still serves, and reached nothing it should not.
    assert_alive(proxy)
    check_upstreams(imds, quiet_decoy, entra)


def test_hostile_requests_never_crash_leak_or_steer(
        proxy: ProxyProcess, imds: FakeImdsClient, entra: FakeEntraClient, quiet_decoy: Decoy,
        pod: Pod) -> None:
    entra_host = entra.base_url.split("://", 1)[1]

    @HOSTILE
    @given(request=hostile_requests(quiet_decoy, entra_host))
    def prop(request: tuple[bytes, bool, str]) -> None:
        raw, complete, method = request
        exchange = talk(proxy.port, raw, half_close=not complete, head=method == "HEAD")
        assert exchange.closed, f"the server neither answered-and-closed nor closed: {raw!r}"
        if complete:
            # A complete request always gets an answer (Connection: close ends the exchange).
            assert exchange.answers, f"complete request dropped without an answer: {raw!r}"
        event(f"complete={complete} answers={[a.status for a in exchange.answers]}")
        for answer in exchange.answers:
            assert not (answer.status == 500 and b"internal_error" in answer.body), (raw, answer)
            assert NODE_TOKEN_MARK.encode() not in answer.body, raw
            if b'"access_token"' in answer.body:
                assert answer.status == 200
                assert may_get_token(naive_parse(raw)), f"token for a request IMDS refuses: {raw!r}"
                claims = decode_fake_token(answer.json()["access_token"])
                assert claims["tid"] == pod.tenant_id.lower()

    prop()
    assert_alive(proxy)
    check_upstreams(imds, quiet_decoy, entra)
    errors = [line for line in proxy.log_text().splitlines()
              if '"level":"error"' in line or "Traceback" in line or "Fatal error" in line]
    assert errors == []


@pytest.mark.parametrize("target", ["http://[::1/metadata/instance", "http://[x]/metadata/instance",
                                    f"http://a]{TOKEN_PATH}?api-version=1&resource=x"])
def test_absolute_form_with_a_malformed_host_is_a_400(proxy: ProxyProcess, imds: FakeImdsClient,
                                                      target: str) -> None:
    """A host urlsplit cannot parse (found by the property above) is a client error."""
    exchange = talk(proxy.port, f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
                    .encode(), half_close=False, timeout_s=5)
    assert [a.status for a in exchange.answers] == [400], exchange
    assert_imds_error_shape(exchange.answers[0])
    assert imds.records() == []


def test_token_only_with_exactly_one_metadata_true(proxy: ProxyProcess,
                                                   entra: FakeEntraClient) -> None:
    granted: list[str] = []
    refused: list[str] = []

    @HOSTILE
    @given(values=METADATA_HEADERS, forwarded=st.booleans(),
           method=st.sampled_from(["GET", "HEAD"]))
    def prop(values: list[str], forwarded: bool, method: str) -> None:
        resource = unique_resource("md")
        lines = [f"{method} {token_target(resource)} HTTP/1.1", "Host: 169.254.169.254",
                 *(f"Metadata: {value}" for value in values), "Connection: close"]
        if forwarded:
            lines.append("X-Forwarded-For: 10.9.8.7")
        exchange = talk(proxy.port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"),
                        half_close=False, head=method == "HEAD")
        (answer,) = exchange.answers
        ok = (method == "GET" and len(values) == 1 and values[0].strip().lower() == "true"
              and not forwarded)
        if ok:
            assert answer.status == 200, answer
            assert answer.json()["resource"] == resource
            granted.append(resource)
        else:
            # A NUL in a header value is malformed HTTP (400) whatever the method.
            malformed = any("\x00" in value for value in values)
            assert answer.status == (400 if malformed or method == "GET" else 405), answer
            if method == "GET":
                assert_imds_error_shape(answer)
            refused.append(resource)

    prop()
    exchanged = [r["form"]["scope"].removesuffix("/.default") for r in entra.exchanges()]
    # One exchange per granted request, none for a refused one (refusals need no exchange).
    assert sorted(exchanged) == sorted(granted)
    assert not set(exchanged) & set(refused)


# llhttp's methods: every one but GET gets 405 on the token path (CONTRACT.md), CONNECT is a
# malformed request there (it needs an authority-form target) and gets 400.
TOKEN_METHODS = ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "COPY", "LOCK",
                 "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND",
                 "UNBIND", "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH",
                 "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK",
                 "SOURCE", "QUERY"]


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_path_answers_only_get(proxy: ProxyProcess, entra: FakeEntraClient,
                                     method: str) -> None:
    target = token_target(unique_resource("verb"))
    body = b"x=1" if method in ("POST", "PUT", "PATCH") else b""
    raw = (f"{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with RawConnection(proxy.port) as conn:
        conn.send(raw + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = conn.read_response(head=method == "HEAD")
        following = conn.read_response()
    assert answer.status == 405, answer
    assert answer.headers["content-type"].startswith("application/json")
    if method != "HEAD":
        doc = answer.json()
        assert set(doc) == {"error", "error_description"} and "GET" in doc["error_description"]
    assert following.status == 200  # the connection stays usable after a 405
    assert entra.exchanges() == []


def test_connect_on_the_token_path_is_refused_and_closed(proxy: ProxyProcess,
                                                    entra: FakeEntraClient) -> None:
    # llhttp completes the CONNECT message (405: not GET), then refuses the tunnel (400).
    exchange = talk(proxy.port, f"CONNECT {TOKEN_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n".encode(),
                    half_close=False)
    assert [a.status for a in exchange.answers] == [405, 400]
    for answer in exchange.answers:
        assert_imds_error_shape(answer)
    assert exchange.closed
    assert entra.exchanges() == []


# ---- limits: exact boundaries -------------------------------------------------------------


def _get(target: str, headers: str = "", body: bytes = b"") -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").encode() + body


def _padded_target(length: int) -> str:
    base = "/readyz?pad="
    return base + "a" * (length - len(base))


# One header costs len(name) + len(value) + 64; Host and Connection are in every request.
_FIXED_HEADER_COST = (4 + 1 + 64) + (10 + 5 + 64)


def _headers_costing(total: int) -> str:
    """X-Pad headers whose cost with the fixed ones is exactly `total` bytes."""
    left = total - _FIXED_HEADER_COST
    lines = []
    while left > 0:
        size = min(left, 4096)
        if left - size and left - size < 64 + 6:
            size = left - (64 + 6)  # keep the last header's value non-negative
        value_len = size - 64 - 5
        lines.append("X-Pad: " + "v" * value_len)
        left -= size
    return "".join(line + "\r\n" for line in lines)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(_get(_padded_target(MAX_TARGET_BYTES)), 200, id="target-at-limit"),
        pytest.param(_get(_padded_target(MAX_TARGET_BYTES + 1)), 414, id="target-over-limit"),
        pytest.param(_get("/readyz", _headers_costing(MAX_HEADER_BYTES)), 200, id="headers-at-limit"),
        pytest.param(_get("/readyz", _headers_costing(MAX_HEADER_BYTES + 1)), 431,
                     id="headers-over-limit"),
        pytest.param(_get("/readyz", "X-A:\r\n" * 255), 431, id="too-many-empty-headers"),
        pytest.param(_get("/readyz", "X-A:\r\n" * 200), 200, id="many-empty-headers"),
        pytest.param(_get("/readyz", f"Content-Length: {MAX_BODY_BYTES}\r\n", b"b" * MAX_BODY_BYTES),
                     200, id="body-at-limit"),
        pytest.param(_get("/readyz", f"Content-Length: {MAX_BODY_BYTES + 1}\r\n",
                          b"b" * (MAX_BODY_BYTES + 1)), 413, id="body-over-limit"),
        pytest.param(_get("/readyz", "Transfer-Encoding: chunked\r\n",
                          b"".join(b"1000\r\n" + b"c" * 4096 + b"\r\n" for _ in range(17)) + b"0\r\n\r\n"),
                     413, id="chunked-body-over-limit"),
    ],
)
def test_limits_answer_their_status_then_close(proxy: ProxyProcess, raw: bytes, status: int) -> None:
    exchange = talk(proxy.port, raw, half_close=status != 200)
    assert [a.status for a in exchange.answers] == [status], exchange.raw[:300]
    if status != 200:
        assert_imds_error_shape(exchange.answers[0])
    assert exchange.closed


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET /" + b"a" * (1 << 20), 414, id="megabyte-request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nX: " + b"v" * (1 << 20), 431, id="megabyte-header"),
        pytest.param(b"POST /metadata/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 1048576\r\n\r\n"
                     + b"b" * (1 << 20), 413, id="megabyte-body"),
    ],
)
def test_floods_past_a_limit_are_refused_and_closed(proxy: ProxyProcess, imds: FakeImdsClient,
                                                     raw: bytes, status: int) -> None:
    """The proxy answers at the limit and closes with the rest unread, so the kernel may
    reset the connection before the client reads the answer: either is a refusal."""
    exchange = talk(proxy.port, raw, half_close=True)
    assert [a.status for a in exchange.answers] in ([status], []), exchange.raw[:300]
    assert exchange.closed
    assert imds.records() == []
    assert_alive(proxy)


def test_a_client_that_never_reads_cannot_grow_the_proxys_memory(proxy: ProxyProcess) -> None:
    """Pipelined requests pile up answers; the proxy stops reading instead of buffering them."""
    rss_before = rss_kib(proxy.proc.pid)
    request = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    chunk = request * 2000
    sent = 0
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                continue
        rss_during = rss_kib(proxy.proc.pid)
    growth_mib = (rss_during - rss_before) / 1024
    # Without back-pressure the proxy would hold every answer it could not write.
    assert sent < 64 * 1024 * 1024, "the sockets never filled up: was the proxy reading at all?"
    assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB while {sent} bytes were pushed"
    assert_alive(proxy)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- pipelining -----------------------------------------------------------------------------

KINDS = ["hit", "miss", "readyz", "405", "400", "instance", "near-miss"]


def _pipelined(kind: str, hot: str) -> tuple[bytes, int, str]:
    """(request, expected status, what identifies its answer)."""
    if kind == "hit":
        return (f"GET {token_target(hot)} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n".encode(), 200, hot)
    if kind == "miss":
        resource = unique_resource("pipe")
        return (f"GET {token_target(resource)} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n".encode(), 200,
                resource)
    if kind == "readyz":
        return b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 200, "ok"
    if kind == "405":
        return (f"DELETE {token_target(hot)} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n".encode(), 405,
                "GET")
    if kind == "400":
        return f"GET {token_target(hot)} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode(), 400, "metadata header"
    if kind == "instance":
        return (b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n",
                200, "aks-nodepool1")
    return (f"GET /metadata/%69dentity/oauth2/token?api-version=1&resource={hot} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            "Metadata: true\r\n\r\n").encode(), 404, "not_found"


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=12))
def test_pipelined_mixed_requests_are_answered_in_order(
        proxy: ProxyProcess, entra: FakeEntraClient, imds: FakeImdsClient,
        kinds: list[str]) -> None:
    hot = "https://pipelined-hot.example.com/"
    assert proxy.token(hot).status == 200
    planned = [_pipelined(kind, hot) for kind in kinds]
    with RawConnection(proxy.port) as conn:
        conn.send(b"".join(request for request, _, _ in planned))
        for (request, status, mark), kind in zip(planned, kinds, strict=True):
            answer = conn.read_response()
            assert answer.status == status, (kind, request, answer)
            assert mark.encode() in answer.body, (kind, answer.body)
        conn.send(b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        assert conn.read_response().status == 200


def test_a_deep_pipeline_pauses_reading_and_keeps_order(proxy: ProxyProcess,
                                                        entra: FakeEntraClient) -> None:
    """100 requests in one send, misses among them: more than the queue holds (32)."""
    hot = unique_resource("deep-hot")
    assert proxy.token(hot).status == 200
    planned = [_pipelined("miss" if i % 10 == 3 else ("hit" if i % 2 else "readyz"), hot)
               for i in range(100)]
    with RawConnection(proxy.port, timeout_s=30) as conn:
        conn.send(b"".join(request for request, _, _ in planned))
        for index, (_, status, mark) in enumerate(planned):
            answer = conn.read_response()
            assert (answer.status, mark.encode() in answer.body) == (status, True), index


# ---- slow clients and the connection bound against the live process ---------------------


async def _trickle(port: int, data: bytes, every_s: float, log: dict[str, Any]) -> None:
    """Send `data` a byte at a time until the server closes; record when and what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    received = b""
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(4096), every_s)
            except TimeoutError:
                continue
            received += got
            if not got:
                break
        else:
            received += await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, OSError):
        pass
    finally:
        log["closed_after_s"] = time.monotonic() - started
        log["received"] = received
        writer.close()


async def _hold(port: int, log: dict[str, Any]) -> None:
    """Connect and say nothing; record whether and when the server closes."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        log["error"] = repr(exc)
        return
    started = time.monotonic()
    try:
        log["received"] = await asyncio.wait_for(reader.read(), 12)
    except (ConnectionError, OSError):
        log["received"] = b""
    except TimeoutError:
        log["received"] = None  # still open
    finally:
        log["closed_after_s"] = time.monotonic() - started
        writer.close()


@pytest.mark.slow
def test_slowloris_and_a_connection_flood_are_cut_and_service_goes_on(
        proxy_factory: Callable[..., ProxyProcess], entra: FakeEntraClient) -> None:
    """1100 connections at once: at most 1024 are held, the rest closed at once; slow ones
    (headers or body a byte at a time) and silent ones are cut at the header-read timeout
    (5 s, swept each second) without an answer; a client that connected first and keeps
    asking is served throughout; afterwards the proxy is healthy."""
    proxy = proxy_factory()
    slow_header = f"GET {token_target(unique_resource('loris'))} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n".encode()
    slow_body = b"POST /metadata/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000

    async def scenario() -> dict[str, Any]:
        steady_reader, steady_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        steady: list[int] = []

        async def keep_asking() -> None:
            for _ in range(40):
                steady_writer.write(b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
                head = await asyncio.wait_for(steady_reader.readuntil(b"\r\n\r\n"), 5)
                length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
                await steady_reader.readexactly(length)
                steady.append(int(head.split()[1]))
                await asyncio.sleep(0.2)

        trickles = [dict[str, Any]() for _ in range(20)]
        bodies = [dict[str, Any]() for _ in range(10)]
        silent = [dict[str, Any]() for _ in range(1070)]
        rss_start = rss_kib(proxy.proc.pid)
        tasks = [asyncio.create_task(keep_asking())]
        tasks += [asyncio.create_task(_trickle(proxy.port, slow_header, 0.4, log)) for log in trickles]
        tasks += [asyncio.create_task(_trickle(proxy.port, slow_body, 0.4, log)) for log in bodies]
        await asyncio.sleep(0.3)  # the slow ones hold their slots before the flood arrives
        tasks += [asyncio.create_task(_hold(proxy.port, log)) for log in silent]
        await asyncio.sleep(2.0)
        rss_flood = rss_kib(proxy.proc.pid)
        await asyncio.gather(*tasks)
        steady_writer.close()
        return {"trickles": trickles, "bodies": bodies, "silent": silent, "steady": steady,
                "rss_growth_kib": rss_flood - rss_start}

    with asyncio.Runner() as runner:
        outcome = runner.run(scenario())

    assert outcome["steady"] == [200] * 40
    slow = outcome["trickles"] + outcome["bodies"]
    rejected = [log for log in outcome["silent"] if log.get("closed_after_s", 99) < 1.0]
    held = [log for log in outcome["silent"] if log.get("closed_after_s", 0) >= 1.0]
    cut_s = sorted(log["closed_after_s"] for log in held + slow)
    print(f"flood: held {len(held)} silent + {len(slow)} slow + 1 steady, refused {len(rejected)}; "
          f"cut after {cut_s[0]:.1f}-{cut_s[-1]:.1f} s; RSS +{outcome['rss_growth_kib'] / 1024:.1f} MiB")
    # 1 steady + 30 slow + held silent ones fit in the bound; the excess is refused at once.
    assert len(held) + len(slow) + 1 <= 1024
    assert len(rejected) >= 1100 - 1024
    for log in held + slow:
        assert log["received"] == b"", log  # cut without an answer, as Go does
        assert 4.0 <= log["closed_after_s"] <= 9.0, log
    assert outcome["rss_growth_kib"] < 32 * 1024, outcome["rss_growth_kib"]
    assert_alive(proxy)
    assert proxy.token(unique_resource("after-flood")).status == 200


# ---- idle keep-alive and the bound, in-process with short limits -------------------------


class Echo:
    """Answers every request at once with its target."""

    def dispatch(self, request: Request) -> Response:
        return Response(200, request.target, b"text/plain")


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: bytes) -> bytes:
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
    return await asyncio.wait_for(reader.readexactly(length), 3)


async def test_idle_keep_alive_connections_are_closed_but_busy_ones_stay() -> None:
    server = HttpServer(Echo(), ServerLimits(header_timeout_s=5.0, keepalive_timeout_s=0.5,
                                             shutdown_grace_s=1.0))
    port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()

    async def closed_at(reader: asyncio.StreamReader) -> float:
        assert await reader.read() == b""  # closed without a word
        return loop.time()

    try:
        idle = await asyncio.open_connection("127.0.0.1", port)
        busy = await asyncio.open_connection("127.0.0.1", port)
        assert await _roundtrip(*idle, b"/idle") == b"/idle"
        answered = loop.time()
        idle_closed = asyncio.create_task(closed_at(idle[0]))
        # The busy client asks every 0.2 s, so its keep-alive deadline keeps moving.
        for i in range(20):
            assert await _roundtrip(*busy, b"/busy/%d" % i) == b"/busy/%d" % i
            await asyncio.sleep(0.2)
        assert idle_closed.done(), "the idle connection outlived its keep-alive timeout"
        # 0.5 s of keep-alive as the once-a-second sweeper sees it: one sweep notices the
        # last activity, a later one finds the connection still quiet.
        assert 0.5 <= idle_closed.result() - answered <= 0.5 + 2.0 + 0.3
        assert len(server.state.connections) == 1
        busy[1].close()
        idle[1].close()
    finally:
        await server.shutdown()


async def test_the_connection_bound_holds_and_frees_slots() -> None:
    server = HttpServer(Echo(), ServerLimits(max_connections=8, shutdown_grace_s=1.0))
    port = await server.start("127.0.0.1", 0)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        for reader, writer in conns:
            assert await _roundtrip(reader, writer, b"/held") == b"/held"
        extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        for reader, _ in extra:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 3) == b""
        assert server.state.rejected_connections == 50
        assert len(server.state.connections) == 8
        # A slot freed is a slot usable again.
        conns[0][1].close()
        await asyncio.sleep(0.2)
        again = await asyncio.open_connection("127.0.0.1", port)
        assert await _roundtrip(*again, b"/again") == b"/again"
        for _, writer in [*conns[1:], *extra, again]:
            writer.close()
    finally:
        await server.shutdown()


def test_token_requests_with_a_fresh_uuid_do_not_grow_memos_without_bound(
        proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    """Distinct refused targets (no exchange) by the thousand: the proxy's memos are bounded."""
    rss_before = rss_kib(proxy.proc.pid)
    with RawConnection(proxy.port, timeout_s=30) as conn:
        for batch in range(20):
            requests = b"".join(
                f"GET {TOKEN_PATH}?api-version=1&resource=r{uuid.uuid4().hex}{'x' * 200} "
                f"HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode() for _ in range(500))
            conn.send(requests)
            for _ in range(500):
                assert conn.read_response().status == 400, batch
    growth_mib = (rss_kib(proxy.proc.pid) - rss_before) / 1024
    assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over 10000 distinct targets"
    assert entra.exchanges() == []
