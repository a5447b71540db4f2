"""Hostile and broken clients against the live proxy: random bytes, mangled requests, slow clients.

Name: test_hostile
Scope: one proxy process (uid 1501) for the module, with METADATA_IP:METADATA_PORT aimed at
    a loopback fake IMDS that records every request it receives (raw head, fields, body),
    and a second fake IMDS (the "decoy") that only ever appears in the requests' own Host
    headers and targets: if pass-through could be steered, the decoy (or the fake Entra)
    would record it. Timeout and connection-bound tests that need short limits run an
    HttpServer in-process, as tests/test_server.py does.
Depends: support.fixtures (proxy, fakes), support.judges (h11, urllib and Node's WHATWG
    URL: the judges share no code with the proxy), hypothesis (profiles in conftest.py).

What is asserted is issue 7, "Hostile or broken clients", judged as issue 16 asks: whatever
arrives, the proxy answers with well-formed HTTP or closes, never crashes; a token only for
a request that h11 reads as an HTTP/1.0 or 1.1 GET of the token path with exactly one
`Metadata: true` and no X-Forwarded-For; a request line without a version or with another
version gets a 400 and a close, and nothing else (no token, no exchange, no pass-through);
pass-through only to METADATA_IP:METADATA_PORT, only for origin-form targets in which no
URL parser finds an `identity` segment, carrying the client's fields and body and nothing
added but the loop marker; slow and idle clients are cut; connections are bounded;
pipelined answers keep their order; the token path answers GET only (CONTRACT.md: 405 for
every other method, HEAD included).

The properties are derandomised in CI (conftest.py's `ci` profile): a failure reproduces
with the same command. `AZWI_HYPOTHESIS_PROFILE=long` runs 20 times as many random ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.fake_entra import FakeEntraClient, decode_fake_token
from support.fake_imds import NODE_TOKEN_MARK, FakeImdsClient
from support.judges import (
    H11Request,
    WhatwgUrl,
    forward_refusal,
    is_relayed_form,
    read_requests,
    relay_differences,
    request_line,
    token_refusal,
)
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

from azwi_netproxy.proxy.server import HttpServer, ServerLimits
from azwi_netproxy.proxy.wire import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_TARGET_BYTES, Request, Response

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(600)

# The loaded profile's example budget relative to Hypothesis' default of 100: 1 in CI,
# 20 with AZWI_HYPOTHESIS_PROFILE=long (see conftest.py).
SCALE = settings().max_examples / 100


def hostile(examples: int) -> settings:
    """Bounded runs, no example database, fixtures shared by all examples (the fakes are
    reset per example or per test, which is what these properties need); the seed and
    the example budget come from the profile."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


HOSTILE = hostile(250)


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
    """Name: quiet_decoy. Scope: function. Depends: decoy. The decoy with its records cleared."""
    decoy.client.reset()
    return decoy


@pytest.fixture(scope="module")
def whatwg() -> Iterator[WhatwgUrl]:
    """Name: whatwg. Scope: module. Node's WHATWG URL parser, one process for the module;
    the tests that judge targets skip, saying why, where there is no Node.js."""
    node, why = WhatwgUrl.probe()
    if node is None:
        pytest.skip(why)
    parser = WhatwgUrl(node)
    try:
        yield parser
    finally:
        parser.close()


# ---- talking raw HTTP -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def has_token(self) -> bool:
        return b'"access_token"' in self.body


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


# ---- what reached the upstreams, example by example ------------------------------------


@dataclass
class Reached:
    """What the fakes received while one example ran."""

    forwarded: list[dict[str, Any]]
    exchanges: list[dict[str, Any]]
    decoy: list[dict[str, Any]]


@dataclass
class Upstreams:
    """The fake IMDS, the decoy and the fake Entra, watched per example: examples run one
    after another and every exchange or pass-through happens before its answer, so what
    the fakes received between two examples belongs to the one in between. (Refresh-ahead
    exchanges cannot interleave: the fake Entra's tokens live an hour, a test minutes.)"""

    imds: FakeImdsClient
    entra: FakeEntraClient
    decoy: Decoy
    pod: Pod
    _entra_seen: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._entra_seen = len(self.entra.records())

    def begin(self) -> None:
        self.imds.reset()

    def reached(self) -> Reached:
        records = self.entra.records()
        exchanges, self._entra_seen = records[self._entra_seen:], len(records)
        if self._entra_seen > 200:
            # Keep the per-example read short on long runs: forget, then re-register the pod.
            self.entra.reset()
            self.entra.add_app(self.pod.tenant_id, self.pod.client_id, [self.pod.subject],
                               self.pod.issuer)
            self._entra_seen = 0
        return Reached(self.imds.records(), exchanges, self.decoy.client.records())

    @property
    def own_authority(self) -> str:
        return f"{self.imds.host}:{self.imds.port}"


@pytest.fixture
def upstreams(imds: FakeImdsClient, entra: FakeEntraClient, quiet_decoy: Decoy,
              pod: Pod) -> Upstreams:
    """Name: upstreams. Scope: function. Depends: imds, entra, quiet_decoy, pod."""
    return Upstreams(imds, entra, quiet_decoy, pod)


def judge_exchange(raw: bytes, exchange: Exchange, reached: Reached, *, ups: Upstreams,
                   whatwg: WhatwgUrl | None, pod: Pod) -> str:
    """Everything the contract says about one connection's bytes and what came of them,
    decided by h11 and the URL parsers. Returns the outcome's name, for `event`.

    Each rule fails on its own line so that Hypothesis reports (and shrinks) each kind of
    breach on its own.
    """
    line = request_line(raw)
    reading = read_requests(raw)
    first = reading.first
    tokens = [answer for answer in exchange.answers if answer.has_token]
    for answer in exchange.answers:
        assert not (answer.status == 500 and b"internal_error" in answer.body), answer
        assert NODE_TOKEN_MARK.encode() not in answer.body, answer

    # 1. The version rule (CONTRACT.md): a 400 and a close, nothing else, ever.
    if line is not None and line.version_refusal is not None:
        why = line.version_refusal
        assert not tokens, f"HOLE(version): a token for a request line with {why}: {tokens[0].body[:80]!r}"
        assert not reached.exchanges, f"HOLE(version): an exchange for a request line with {why}"
        assert not reached.forwarded, (f"HOLE(version): passed through a request line with {why}: "
                                       f"{[r['raw_target'] for r in reached.forwarded]}")
        assert [a.status for a in exchange.answers] in ([], [400]), (
            f"HOLE(version): {why} answered {[a.status for a in exchange.answers]}, not one 400")
        assert exchange.closed, f"HOLE(version): the connection stayed open after {why}"

    # 2. A token, or an exchange, only for a request h11 reads and the contract allows.
    refusal = token_refusal(first)
    if first is None:
        assert not tokens, f"a token for bytes h11 refuses ({reading.refusal})"
        assert not reached.exchanges, f"an exchange for bytes h11 refuses ({reading.refusal})"
    for answer in tokens:
        assert refusal is None, f"a token for a request the contract refuses ({refusal})"
        assert answer.status == 200, answer
        claims = decode_fake_token(answer.json()["access_token"])
        assert claims["tid"] == pod.tenant_id.lower(), claims
    if refusal is not None:
        assert not reached.exchanges, (f"an exchange for a request the contract refuses ({refusal}): "
                                       f"{[r['form'].get('scope') for r in reached.exchanges]}")
    for record in reached.exchanges:
        assert record["method"] == "POST" and record["path"].endswith("/oauth2/v2.0/token"), record

    # 3. Pass-through: nothing to the decoy; to the fake IMDS only targets every parser reads
    # as a path there without an identity segment, from a request that was read as one.
    assert not reached.decoy, f"pass-through reached the decoy: {reached.decoy}"
    parsers = [whatwg]
    sent: list[tuple[str, H11Request | None]] = [(r.target.decode("ascii"), r) for r in reading.requests]
    if line is not None and not reading.requests:
        sent.append((line.target.decode("latin-1"), None))
    for record in reached.forwarded:
        hosts = [value for name, value in record["raw_headers"] if name.lower() == "host"]
        assert hosts == [ups.own_authority], f"pass-through with Host {hosts}: {record['raw_head']!r}"
        received = record["raw_target"]
        matches = [(target, request) for target, request in sent if is_relayed_form(received, target)]
        if not matches and len(sent) == 1:
            # One request on the connection, so this is it, its target rewritten on the way
            # (httpx removes dot segments): both spellings are judged below.
            matches = sent
        assert matches, (f"passed through {received!r}, the target of no request h11 read "
                         f"({[target for target, _ in sent]})")
        client_target, request = matches[0]
        # One line per kind of breach, so that Hypothesis reports each on its own.
        barred = forward_refusal(client_target, parsers) or forward_refusal(received, parsers)
        if barred is not None and barred.kind == "not origin-form":
            raise AssertionError(f"HOLE(pass-through): forwarded {client_target!r} as {received!r}: {barred}")
        if barred is not None and barred.kind == "another host":
            raise AssertionError(f"HOLE(pass-through): forwarded {client_target!r} as {received!r}: {barred}")
        if barred is not None and barred.kind == "identity segment":
            raise AssertionError(f"HOLE(pass-through): forwarded {client_target!r} as {received!r}: {barred}")
        assert barred is None, f"forwarded {client_target!r} as {received!r}: {barred}"
        if request is not None:
            # 4. Exactly what was sent: the client's fields and body, nothing added.
            diff = relay_differences(request, record["raw_headers"], bytes.fromhex(record["body_hex"]),
                                     own_host=ups.own_authority)
            assert not diff.added, f"HOLE(relay): fields the client never sent: {diff.added}"
            assert not diff.dropped, f"the relay dropped end-to-end fields: {diff.dropped}"
            assert not diff.reordered, f"the relay reordered fields of one name: {record['raw_headers']}"
            assert not diff.framing, f"the relay's framing: {diff.framing}"
            assert bytes.fromhex(record["body_hex"]) == request.body, "the request body changed on the way"

    if tokens:
        outcome = "token"
    elif reached.forwarded:
        outcome = "forwarded"
    elif exchange.answers:
        outcome = f"refused {exchange.answers[0].status}"
    else:
        outcome = "closed without an answer"
    ups.counts[outcome.split()[0]] += 1
    return outcome


def check_upstreams(imds: FakeImdsClient, decoy: Decoy, entra: FakeEntraClient,
                    whatwg: WhatwgUrl | None) -> None:
    """Whatever the fake IMDS holds now came on its own address and is a target the URL
    parsers allow through; nothing reached the decoy; the fake Entra saw only exchanges."""
    own = f"{imds.host}:{imds.port}"
    for record in imds.records():
        host = [value for name, value in record["headers"] if name.lower() == "host"]
        assert host == [own], record
        assert forward_refusal(record["raw_target"], [whatwg]) is None, record
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
    "/metadata/identity;x/oauth2/token", "/metadata./identity/oauth2/token",
    "/metadata/identity%00/oauth2/token", "/metadata/identity%20/oauth2/token",
    "/metadata/identity./oauth2/token", "/metadta/identity/oauth2/token",
    "/metadata/identityoauth2/token", "/metadata/identity/%2e%2e/instance",
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
    """Absolute-form and network-path prefixes naming hosts other than METADATA_IP:METADATA_PORT."""
    return st.sampled_from([
        "", "", "", f"http://{decoy.authority}", f"HTTP://{decoy.authority}",
        f"https://{decoy.authority}", f"http://user@{decoy.authority}",
        f"http://{decoy.authority}@{decoy.authority}", f"http://{entra_host}",
        "http://169.254.169.254", "http://localhost:1", "http://[::1]:1", "http://[::1",
        "http://[x]", "http://a]", f"//{decoy.authority}", "http://other-host:99999",
        "http://%31%32%37.0.0.1:1", "http:/", "http:\\\\other-host", f"/\\{decoy.authority}",
        f"\\\\{decoy.authority}",
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


# Versions aimed at issue 16's first hole, and what an attacker writes instead of one.
BAD_VERSIONS = ["HTTP/0.9", "HTTP/1.2", "HTTP/2.0", "HTTP/2", "HTTP/3", "HTTP/3.0", "HTTP/9.9",
                "HTTP/0.1", "HTTP/1.9", "HTTP/1.1x", "http/1.1", "HTTP/11", "HTTP/1.01", "HTTP/01.1",
                "HTTP/1.", "HTTP/ 1.1", "HTTP/1.1 extra", "RTSP/1.0", "ICE/1.0", "HTTPS/1.1", "HTTP"]
GOOD_VERSIONS = ["HTTP/1.1", "HTTP/1.0"]


@dataclass
class Planned:
    """A request a strategy built, with what a correct proxy must do with it (None: the
    judges decide alone)."""

    raw: bytes
    must: str | None = None  # "token" or "forward"
    target: str = ""


@st.composite
def versioned_requests(draw: st.DrawFn) -> Planned:
    """Token, pass-through and readiness requests with every kind of version: none at all
    (the HTTP/0.9 shape, headers and all, as a CRLF injected into an app's URL makes it),
    HTTP/0.9, 1.2, 2.0, 3, garbage; and valid ones among them."""
    resource = unique_resource("ver")
    target = draw(st.sampled_from([token_target(resource), token_target(resource, path=TOKEN_PATH + "/"),
                                   "/metadata/instance?api-version=2021-02-01", "/readyz"]))
    kind = draw(st.sampled_from(["good", "good", "bad", "bad", "none", "injected", "regex"]))
    if kind == "good":
        version = draw(st.sampled_from(GOOD_VERSIONS))
    elif kind == "bad":
        version = draw(st.sampled_from(BAD_VERSIONS))
    elif kind == "regex":
        version = draw(st.from_regex(r"HTTP/[0-9]\.[0-9]", fullmatch=True))
    else:
        version = ""
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    fields = [("Metadata", "true"), ("Host", "169.254.169.254")]
    draw(st.randoms()).shuffle(fields)
    fields.append(("Connection", "close"))
    if kind == "injected":
        # The app wrote `GET <url> HTTP/1.1` with <url> = target + CRLF + "Metadata: true" +
        # CRLF + "X-Tail:": its own version ends up in a header field.
        head = [f"GET {target}", "Metadata: true", "X-Tail: HTTP/1.1", "Host: 169.254.169.254",
                "Connection: close"]
    else:
        head = [f"GET {target} {version}" if version else f"GET {target}",
                *(f"{name}: {value}" for name, value in fields)]
    must = None
    if version in GOOD_VERSIONS and eol == "\r\n":
        must = "token" if target.startswith(TOKEN_PATH) else "forward" if "instance" in target else None
    return Planned((eol.join(head) + eol + eol).encode("latin-1"), must, target)


# Pieces of targets aimed at issue 16's second hole: identity paths by other spellings.
PREFIXES = ["", "", "", "", "/", "//169.254.169.254", "//decoy.invalid", "/\\decoy.invalid",
            "\\\\decoy.invalid", "http://decoy.invalid", "HTTP://169.254.169.254",
            "http://169.254.169.254", "http:", "/x/..", "/x/%2e%2e", "/.", "/%2e"]
METADATA_SPELLINGS = ["metadata", "metadata", "METADATA", "Metadata", "metadata.", "metadata%2e",
                      "metadata;x", "metadata%20", "metadta", "meta%64ata", "metadata%00",
                      "x/../metadata", "x/%2e%2e/metadata", "X/%2E%2E/metadata",
                      "metadata/instance/..", "metadata/instance/%2e%2e", "metadata/."]
SEPARATORS = ["/", "/", "/", "//", "/./", "/%2e/", "\\", "%2f", "%2F", "%5c", "%5C", "%252f",
              "/x/../", "/x/%2e%2e/", "/;x/"]
IDENTITY_SPELLINGS = ["identity", "identity", "IDENTITY", "Identity", "iDeNtItY", "%69dentity",
                      "%49DENTITY", "%2569dentity", "%252569dentity", "identity;x", "identity;",
                      "identity.", "identity..", "identity%2e", "identity%00", "identity%20",
                      "identity%09", "identity%0d%0a", "identity%7f", "identity%ff", "identity-x",
                      "i%64entity", "%69%64%65%6e%74%69%74%79", "ident%69ty", "identityoauth2"]
TAILS = ["/oauth2/token", "/oauth2/token", "/oauth2/token/", "oauth2/token", "", "/",
         "/oauth2/token/..", "%2Foauth2%2Ftoken", "/oauth2/token;x", "/oauth2/%74oken",
         "\\oauth2\\token"]
RAW_BYTES = ["\x00", "\x01", "\x7f", "\t", " ", "\x0b", "\x0c", "\u00e9"]
# Targets the contract forwards (no identity segment, origin-form): they must reach the
# fake IMDS; and spellings of the token path it answers itself.
PASS_THROUGH = ["/metadata/instance?api-version=2021-02-01",
                "/metadata/instance/compute?api-version=2021-02-01&format=json",
                "/metadata/versions", "/metadata/scheduledevents?api-version=2020-07-01",
                "/metadata/attested/document?api-version=2020-09-01",
                "/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress"
                "?api-version=2017-08-01&format=text"]
TOKEN_SPELLINGS = [TOKEN_PATH, TOKEN_PATH + "/", "/METADATA/identity/oauth2/token",
                   "/MetaData/identity/oauth2/token/"]


@st.composite
def hostile_targets(draw: st.DrawFn) -> Planned:
    """Well-formed HTTP/1.1 requests whose targets spell the identity path other ways:
    network-path and absolute forms, backslashes, dot segments plain and encoded, `;`
    parameters, trailing dots, spaces and control bytes (encoded and raw), near misses,
    case and double encoding; valid token and pass-through targets among them."""
    resource = unique_resource("tgt")
    query = f"?api-version=2018-02-01&resource={resource}"
    kind = draw(st.sampled_from(["spelled", "spelled", "spelled", "pass", "token"]))
    must = None
    if kind == "pass":
        target, must = draw(st.sampled_from(PASS_THROUGH)), "forward"
    elif kind == "token":
        target, must = draw(st.sampled_from(TOKEN_SPELLINGS)) + query, "token"
    else:
        target = (draw(st.sampled_from(PREFIXES)) + "/" + draw(st.sampled_from(METADATA_SPELLINGS))
                  + draw(st.sampled_from(SEPARATORS)) + draw(st.sampled_from(IDENTITY_SPELLINGS))
                  + draw(st.sampled_from(TAILS)) + draw(st.sampled_from([query, query, ""])))
        if draw(st.integers(0, 9)) == 0:
            at = draw(st.integers(0, len(target)))
            target = target[:at] + draw(st.sampled_from(RAW_BYTES)) + target[at:]
    raw = (f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
           "Connection: close\r\n\r\n").encode("latin-1", "replace")
    return Planned(raw, must, target)


FIELD_NAMES = ["Accept", "Accept-Encoding", "User-Agent", "Authorization", "Cookie",
               "Accept-Language", "If-None-Match", "Cache-Control", "X-Ms-Client-Request-Id",
               "Content-Type", "x-ms-app", "ACCEPT", "user-agent", "Via", "Forwarded"]
FIELD_VALUE = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)
HOP_FIELDS = [[("Connection", "X-Hop"), ("X-Hop", "1")], [("Keep-Alive", "timeout=5")],
              [("TE", "trailers")], [("Proxy-Connection", "keep-alive")],
              [("Proxy-Authorization", "Basic eDp5")], [("X-Forwarded-For", "10.1.2.3")],
              [("Connection", "keep-alive, X-A"), ("X-A", "a"), ("x-a", "b")]]


@st.composite
def relayed_requests(draw: st.DrawFn) -> Planned:
    """Pass-through requests with end-to-end fields of every kind (repeated, any case),
    hop-by-hop ones among them, and bodies, with a Content-Length or chunked."""
    target = draw(st.sampled_from(PASS_THROUGH))
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH"]))
    fields = [("Metadata", "true")]
    fields += draw(st.lists(st.tuples(
        st.sampled_from(FIELD_NAMES) | st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True),
        FIELD_VALUE), max_size=6))
    for hop in draw(st.lists(st.sampled_from(HOP_FIELDS), max_size=2)):
        fields += hop
    draw(st.randoms()).shuffle(fields)
    fields = [("Host", "169.254.169.254"), *fields]
    body = b""
    if method in ("POST", "PUT", "PATCH") and draw(st.booleans()):
        body = draw(st.binary(min_size=1, max_size=300))
    framed = body
    if body and draw(st.booleans()):
        fields.append(("Transfer-Encoding", "chunked"))
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif body or method != "GET":
        fields.append(("Content-Length", str(len(body))))
    fields.append(("Connection", "close"))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    return Planned(head.encode() + b"\r\n" + framed, "forward", target)


# ---- properties against the live server ---------------------------------------------------


def _run_planned(proxy: ProxyProcess, ups: Upstreams, whatwg: WhatwgUrl | None, pod: Pod,
                 planned: Planned) -> str:
    ups.begin()
    exchange = talk(proxy.port, planned.raw, half_close=False, timeout_s=10)
    reached = ups.reached()
    # What a correct proxy must do, first: the judges below only say what it must not.
    if planned.must == "token":
        assert [a.status for a in exchange.answers] == [200] and exchange.answers[0].has_token, (
            f"a valid token request got no token: {exchange.raw[:300]!r}")
    if planned.must == "forward":
        assert [r["raw_target"] for r in reached.forwarded] == [planned.target], (
            f"a valid pass-through did not reach the stand-in: {exchange.raw[:300]!r}")
        (record,) = reached.forwarded
        (answer,) = exchange.answers
        assert answer.status == record["status"], (answer, record["status"])
        assert answer.body == bytes.fromhex(record["answer_hex"]), "the answer's body changed on the way"
    return judge_exchange(planned.raw, exchange, reached, ups=ups, whatwg=whatwg, pod=pod)


def _assert_not_vacuous(ups: Upstreams, *kinds: str) -> None:
    print(f"outcomes: {dict(ups.counts)}")
    for kind in kinds:
        assert ups.counts[kind] > 0, f"no example ended {kind!r}: {dict(ups.counts)}"


def test_random_bytes_get_well_formed_answers_or_a_close(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod) -> None:
    @HOSTILE
    @given(data=st.binary(max_size=2048))
    def prop(data: bytes) -> None:
        upstreams.begin()
        exchange = talk(proxy.port, data, half_close=True)
        assert exchange.closed, f"not closed after a half-close: {exchange}"
        event(judge_exchange(data, exchange, upstreams.reached(), ups=upstreams, whatwg=whatwg,
                             pod=pod))

    prop()
    # After every example: the same process still serves, and reached nothing it should not.
    assert_alive(proxy)
    check_upstreams(upstreams.imds, upstreams.decoy, upstreams.entra, whatwg)


def test_hostile_requests_never_crash_leak_or_steer(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod) -> None:
    entra_host = upstreams.entra.base_url.split("://", 1)[1]

    @HOSTILE
    @given(request=hostile_requests(upstreams.decoy, entra_host))
    def prop(request: tuple[bytes, bool, str]) -> None:
        raw, complete, method = request
        upstreams.begin()
        exchange = talk(proxy.port, raw, half_close=not complete, head=method == "HEAD")
        assert exchange.closed, f"the server neither answered-and-closed nor closed: {raw!r}"
        if complete:
            # A complete request always gets an answer (Connection: close ends the exchange).
            assert exchange.answers, f"complete request dropped without an answer: {raw!r}"
        outcome = judge_exchange(raw, exchange, upstreams.reached(), ups=upstreams, whatwg=whatwg,
                                 pod=pod)
        event(f"complete={complete} {outcome}")

    prop()
    _assert_not_vacuous(upstreams, "token", "forwarded", "refused")
    assert_alive(proxy)
    check_upstreams(upstreams.imds, upstreams.decoy, upstreams.entra, whatwg)
    errors = [line for line in proxy.log_text().splitlines()
              if '"level":"error"' in line or "Traceback" in line or "Fatal error" in line]
    assert errors == []


def test_only_http_1_0_and_1_1_are_answered(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod) -> None:
    """Issue 16, hole 1: a request line without a version (the shape a CRLF injected into
    an app's URL makes) or with a version other than 1.0/1.1 gets a 400 and a close: no
    token, no exchange, no pass-through. Valid ones among them still get their token or
    reach the stand-in."""

    @hostile(150)
    @given(planned=versioned_requests())
    def prop(planned: Planned) -> None:
        event(_run_planned(proxy, upstreams, whatwg, pod, planned))

    prop()
    _assert_not_vacuous(upstreams, "token", "forwarded", "refused")


def test_identity_paths_by_any_spelling_never_pass_through(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod) -> None:
    """Issue 16, hole 2: no target in which urllib or WHATWG URL reads another host or an
    `identity` segment (decoded, cleaned as CONTRACT.md says) reaches the stand-in; valid
    pass-through targets do, and valid token requests get tokens."""

    @hostile(300)
    @given(planned=hostile_targets())
    def prop(planned: Planned) -> None:
        event(_run_planned(proxy, upstreams, whatwg, pod, planned))

    prop()
    _assert_not_vacuous(upstreams, "token", "forwarded", "refused")


def test_pass_through_relays_exactly_what_the_client_sent(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod) -> None:
    """Issue 16, hole 3: the stand-in receives the client's own fields (hop-by-hop ones
    removed) and body, nothing added but the loop marker; the client gets the stand-in's
    body unchanged."""

    @hostile(100)
    @given(planned=relayed_requests())
    def prop(planned: Planned) -> None:
        event(_run_planned(proxy, upstreams, whatwg, pod, planned))

    prop()
    _assert_not_vacuous(upstreams, "forwarded")


# Issue 16's holes one by one, so the note can list which spelling did what.
VERSION_CASES = {
    "no-version": "GET {target}\r\nMetadata: true\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
    "crlf-injected": "GET {target}\r\nMetadata: true\r\nX-Tail: HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                     "Connection: close\r\n\r\n",
    **{version: f"GET {{target}} {version}\r\nMetadata: true\r\nHost: 169.254.169.254\r\n"
                "Connection: close\r\n\r\n" for version in BAD_VERSIONS},
}


@pytest.mark.parametrize("shape", list(VERSION_CASES.values()), ids=list(VERSION_CASES))
def test_each_other_version_gets_a_400_and_a_close(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod, shape: str) -> None:
    for target in (token_target(unique_resource("v")), "/metadata/instance?api-version=2021-02-01"):
        raw = shape.format(target=target).encode()
        assert request_line(raw) is not None and request_line(raw).version_refusal  # type: ignore[union-attr]
        _run_planned(proxy, upstreams, whatwg, pod, Planned(raw))


# Requests with an HTTP/1.1 request line that h11 refuses for what follows it: none may
# get a token or cause an exchange (issue 16's oracle). RFC 9112, section 3.2: "A server
# MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request message that
# lacks a Host header field and to any request message that contains more than one Host
# header field line".
H11_REFUSES = {
    "no-host": "GET {target} HTTP/1.1\r\nMetadata: true\r\nConnection: close\r\n\r\n",
    "two-hosts": "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nHost: 169.254.169.254\r\n"
                 "Metadata: true\r\nConnection: close\r\n\r\n",
    "nul-in-a-value": "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\x00\r\n"
                      "Connection: close\r\n\r\n",
    "space-before-colon": "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata : true\r\n"
                          "Connection: close\r\n\r\n",
    "transfer-coding-gzip": "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
                            "Transfer-Encoding: gzip\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("shape", list(H11_REFUSES.values()), ids=list(H11_REFUSES))
def test_requests_h11_refuses_get_no_token(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod, shape: str) -> None:
    raw = shape.format(target=token_target(unique_resource("h11"))).encode()
    assert read_requests(raw).first is None
    _run_planned(proxy, upstreams, whatwg, pod, Planned(raw))


SPELLINGS = {
    "network-path": "//decoy.invalid/metadata/identity/oauth2/token",
    "network-path-instance": "//decoy.invalid/metadata/instance",
    "backslash-authority": "/\\decoy.invalid/metadata/instance",
    "absolute-form": "http://decoy.invalid/metadata/instance",
    "absolute-form-imds": "http://169.254.169.254/metadata/instance",
    "params": "/metadata/identity;x/oauth2/token",
    "trailing-dot-metadata": "/metadata./identity/oauth2/token",
    "nul": "/metadata/identity%00/oauth2/token",
    "space": "/metadata/identity%20/oauth2/token",
    "trailing-dot": "/metadata/identity./oauth2/token",
    "tab": "/metadata/identity%09/oauth2/token",
    "encoded-dot-dot": "/metadata/instance/%2e%2e/identity/oauth2/token",
    "encoded-dot-dot-hides": "/metadata/identity/%2e%2e/instance",
    "backslashes": "/metadata\\identity\\oauth2\\token",
    "near-miss-metadta": "/metadta/identity/oauth2/token",
    "joined": "/metadata/identityoauth2/token",
    "mixed-case": "/metadata/IdEnTiTy/oauth2/token",
    "encoded": "/metadata/%69dentity/oauth2/token",
    "double-encoded": "/metadata/%2569dentity/oauth2/token",
    "encoded-slash": "/metadata%2Fidentity%2Foauth2%2Ftoken",
    "identity-elsewhere": "/metadata/instance/identity",
}


@pytest.mark.parametrize("target", list(SPELLINGS.values()), ids=list(SPELLINGS))
def test_each_identity_spelling_is_refused_not_forwarded(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod, target: str) -> None:
    query = f"?api-version=2018-02-01&resource={unique_resource('sp')}"
    raw = (f"GET {target}{query} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
           "Connection: close\r\n\r\n").encode()
    assert forward_refusal(target + query, [whatwg]) is not None
    _run_planned(proxy, upstreams, whatwg, pod, Planned(raw))


@pytest.mark.parametrize("target", PASS_THROUGH)
def test_valid_pass_through_targets_reach_the_stand_in(
        proxy: ProxyProcess, upstreams: Upstreams, whatwg: WhatwgUrl, pod: Pod, target: str) -> None:
    """The other side of the judges: what the contract forwards does get forwarded (the
    relay's fields are judged too, so this also fails on issue 16's hole 3)."""
    raw = (f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n"
           "Connection: close\r\n\r\n").encode()
    assert forward_refusal(target, [whatwg]) is None
    assert _run_planned(proxy, upstreams, whatwg, pod, Planned(raw, "forward", target)) == "forwarded"


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
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        exchange = talk(proxy.port, raw, half_close=False, head=method == "HEAD")
        (answer,) = exchange.answers
        reading = read_requests(raw)
        if token_refusal(reading.first) is None:
            assert answer.status == 200, answer
            assert answer.json()["resource"] == resource
            granted.append(resource)
        else:
            # h11 refuses a NUL in a field value as malformed HTTP; the proxy must say 400
            # whatever the method. Otherwise IMDS's statuses: 400 for GET, 405 for HEAD.
            malformed = reading.first is None
            assert answer.status == (400 if malformed or method == "GET" else 405), answer
            if method == "GET":
                assert_imds_error_shape(answer)
            refused.append(resource)

    prop()
    exchanged = [r["form"]["scope"].removesuffix("/.default") for r in entra.exchanges()]
    # One exchange per granted request, none for a refused one (refusals need no exchange).
    assert sorted(exchanged) == sorted(granted)
    assert granted and refused
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
