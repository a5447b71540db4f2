"""Judges for the hostile tests: what a strict HTTP/1.1 parser and real URL parsers make of
a request, and what the contract then allows the proxy to do with it.

Owns: the h11 reading of raw request bytes (`read_requests`); the readings of a request
target by Python's urllib (`urljoin` against http://169.254.169.254/) and by the WHATWG URL
parser of Node.js (`WhatwgUrl`, one long-lived `node` process); the contract's rules stated
over those readings (CONTRACT.md, "The token endpoint"): who may get a token
(`token_refusal`, `request_line` for the version rule), which targets may be passed through (`forward_refusal`), and what a
forwarded request may carry (`relay_differences`).

Must not know: azwi_netproxy. Nothing here imports it or copies its reading of a request:
framing, versions, header fields, authority, dot segments and backslashes come from h11,
urllib and WHATWG URL. What is written out by hand is only the contract's own wording (the
token path's spelling, the segment-cleaning rule, the hop-by-hop list of RFC 9110), so a
judge agrees with the product only where both follow the contract.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import h11

METADATA_HOST = "169.254.169.254"
IMDS_BASE = f"http://{METADATA_HOST}/"
# CONTRACT.md: "/metadata is case-insensitive, a trailing / after token is accepted".
_TOKEN_TAILS = ("/identity/oauth2/token", "/identity/oauth2/token/")
LOOP_MARKER = "x-azwi-netproxy-loop"
ANSWERED_VERSIONS = (b"1.0", b"1.1")


# ---- h11: the request as a strict HTTP/1.1 parser reads it ---------------------------------


@dataclass(frozen=True)
class H11Request:
    """One complete request as h11 saw it. Header names keep the client's case."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


@dataclass(frozen=True)
class H11Reading:
    """What h11 made of some bytes: the complete requests it accepted, in order, and why it
    stopped (None: it read everything; else its error or "incomplete")."""

    requests: tuple[H11Request, ...]
    refusal: str | None

    @property
    def first(self) -> H11Request | None:
        return self.requests[0] if self.requests else None


def read_requests(raw: bytes) -> H11Reading:
    """Feed `raw` to an h11 server connection, answering each request with an empty 204 so
    that pipelined requests are read too (h11 stops where HTTP/1.1 says the connection
    must close).

    Empty lines before the first request line are skipped first: RFC 9112, section 2.2
    says a server SHOULD ignore them, and h11 does not."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(raw.lstrip(b"\r\n"))
    done: list[H11Request] = []
    current: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return H11Reading(tuple(done), f"h11: {exc}")
        if event is h11.NEED_DATA:
            pending = conn.their_state is not h11.IDLE or conn.trailing_data[0]
            return H11Reading(tuple(done), "incomplete" if pending else None)
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return H11Reading(tuple(done), None)
        if isinstance(event, h11.Request):
            current, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            done.append(H11Request(current.method, current.target, current.http_version,
                                   tuple(current.headers.raw_items()), bytes(body)))
            try:
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    rest = conn.trailing_data[0]
                    return H11Reading(tuple(done), "bytes after a request that ends the connection"
                                      if rest.strip() else None)
                conn.start_next_cycle()
            except h11.LocalProtocolError as exc:  # e.g. a 1.0 request without keep-alive
                return H11Reading(tuple(done), f"h11 (local): {exc}")


@dataclass(frozen=True)
class RequestLine:
    """The first request line of some bytes. `version_refusal` says why its version is not
    one the contract answers (None: HTTP/1.0 or HTTP/1.1)."""

    method: bytes
    target: bytes
    version: bytes  # the version as sent, b"" when the line has none
    version_refusal: str | None
    h11_accepts_line: bool


def _h11_line(line: bytes) -> H11Request | None:
    # The line alone, then a Host field and the end of the head: what h11 thinks of the
    # line itself, whatever the fields that follow it in the real request.
    return read_requests(line + b"\r\nHost: judge\r\n\r\n").first


def request_line(raw: bytes) -> RequestLine | None:
    """The first request line in `raw` (None: there is none yet).

    CONTRACT.md: a request line without a version, or with another version than 1.0 or
    1.1, gets a 400 and the connection closed. When h11 refuses the line as a whole, the
    version is what follows its last space (RFC 9112, section 3: request-line = method SP
    request-target SP HTTP-version; neither a target nor a version contains a space), and
    h11 judges that version alone.
    """
    line = raw.lstrip(b"\r\n").split(b"\n", 1)[0].removesuffix(b"\r")
    if not line or b"\n" not in raw.lstrip(b"\r\n"):
        return None
    seen = _h11_line(line)
    if seen is not None:
        refusal = None if seen.http_version in ANSWERED_VERSIONS else f"HTTP/{seen.http_version.decode()}"
        return RequestLine(seen.method, seen.target, b"HTTP/" + seen.http_version, refusal, True)
    method, _, rest = line.partition(b" ")
    target, space, version = rest.rpartition(b" ")
    if not space:
        return RequestLine(method, rest, b"", "no HTTP version (the HTTP/0.9 shape)", False)
    alone = _h11_line(b"GET / " + version)
    if alone is None:
        return RequestLine(method, target, version, f"{version!r} is not an HTTP version", False)
    refusal = None if alone.http_version in ANSWERED_VERSIONS else f"HTTP/{alone.http_version.decode()}"
    return RequestLine(method, target, version, refusal, False)


def is_token_target(target: str) -> bool:
    """The token path as CONTRACT.md spells it, in origin form, or in the absolute form a
    server must accept (RFC 9112, section 3.2.2), read by urlsplit."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:
            return False
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return False
        path = parts.path
    elif target.startswith("/") and not target.startswith("//"):
        path = target.partition("?")[0].partition("#")[0]
    else:
        return False
    return path[:9].lower() == "/metadata" and path[9:] in _TOKEN_TAILS


def token_refusal(request: H11Request | None) -> str | None:
    """Why the contract forbids a token for this request (None: it may get one)."""
    if request is None:
        return "h11 refused the bytes"
    if request.http_version not in ANSWERED_VERSIONS:
        return f"HTTP/{request.http_version.decode()} is not answered"
    if request.method != b"GET":
        return "not GET"
    if not is_token_target(request.target.decode("ascii")):
        return "not the token path"
    metadata = request.values(b"metadata")
    if len(metadata) != 1 or metadata[0].strip().lower() != b"true":
        return "not exactly one Metadata: true"
    if request.values(b"x-forwarded-for"):
        return "X-Forwarded-For"
    return None


# ---- URL parsers: what a target means ---------------------------------------------------


@dataclass(frozen=True)
class UrlReading:
    parser: str
    host: str | None  # None: the parser refused the target
    path: str
    error: str = ""


def urllib_reading(target: str) -> UrlReading:
    """The target resolved against http://169.254.169.254/ by Python's urljoin."""
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(IMDS_BASE, target))
        host = parts.netloc
    except ValueError as exc:
        return UrlReading("urllib", None, "", str(exc))
    return UrlReading("urllib", host, parts.path)


_NODE_SCRIPT = r"""
const readline = require("readline");
const lines = readline.createInterface({input: process.stdin, terminal: false});
lines.on("line", (line) => {
  const {t, base} = JSON.parse(line);
  let answer;
  try {
    const u = new URL(t, base);
    answer = {host: u.host, pathname: u.pathname};
  } catch (e) {
    answer = {error: String(e.code || e.message)};
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
});
"""


class WhatwgUrl:
    """Node's WHATWG URL parser as a subprocess: one JSON line in, one out, per target."""

    def __init__(self, node: str) -> None:
        self._proc = subprocess.Popen([node, "-e", _NODE_SCRIPT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                      bufsize=1)
        self._lock = threading.Lock()
        self._memo: dict[str, UrlReading] = {}

    @staticmethod
    def probe() -> tuple[str | None, str]:
        """(path of a node that has WHATWG URL, "") or (None, why not)."""
        node = shutil.which("node")
        if node is None:
            return None, "node (Node.js) is not installed: the WHATWG URL judge needs it (apt-get install nodejs)"
        check = subprocess.run([node, "-e", 'new URL("/a", "http://b/")'], capture_output=True,
                               text=True, check=False, timeout=30)
        if check.returncode != 0:
            return None, f"{node} has no WHATWG URL: {check.stderr.strip()[-200:]}"
        return node, ""

    def reading(self, target: str) -> UrlReading:
        known = self._memo.get(target)
        if known is not None:
            return known
        assert self._proc.stdin is not None and self._proc.stdout is not None
        with self._lock:
            self._proc.stdin.write(json.dumps({"t": target, "base": IMDS_BASE}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the node URL parser exited ({self._proc.poll()})")
        doc = json.loads(line)
        if "error" in doc:
            result = UrlReading("whatwg", None, "", doc["error"])
        else:
            # WHATWG serialises the host in its ASCII form; compare it as urllib's netloc.
            result = UrlReading("whatwg", doc["host"], doc["pathname"])
        if len(self._memo) < 100_000:
            self._memo[target] = result
        return result

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


_TRAILING_JUNK = "". join(chr(c) for c in range(0x21)) + ".\x7f"


def _decoded(segment: str) -> str:
    """Percent-decoded until nothing changes (double encoding hides nothing), as bytes
    read one to one (latin-1) so that no decoding error masks a byte."""
    data = segment.encode("latin-1", "replace")
    for _ in range(16):
        again = urllib.parse.unquote_to_bytes(data)
        if again == data:
            break
        data = again
    return data.decode("latin-1")


def identity_segment(path: str) -> str | None:
    """The first segment of `path` that the contract's rule reads as `identity…`: each
    segment percent-decoded (repeatedly), split again where decoding made a slash or a
    backslash, cut at `;`, stripped of trailing dots, spaces and control bytes, lower-cased."""
    for segment in path.split("/"):
        for piece in re.split(r"[/\\]", _decoded(segment)):
            cleaned = piece.partition(";")[0].rstrip(_TRAILING_JUNK).lower()
            if cleaned.startswith("identity"):
                return segment
    return None


def is_origin_form(target: str) -> bool:
    """RFC 9112's origin-form: an absolute path (one leading `/`), then an optional query."""
    return target.startswith("/") and not target.startswith("//")


@dataclass(frozen=True)
class ForwardRefusal:
    """Why a target may not be passed through: `kind` is one of "not origin-form",
    "unparseable", "another host", "identity segment"; `detail` says which parser read what."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def forward_refusal(target: str, parsers: Sequence[WhatwgUrl | None]) -> ForwardRefusal | None:
    """Why the contract forbids passing `target` through (None: it may be forwarded).

    Only an origin-form target, which every parser reads as a path on 169.254.169.254
    itself, and in whose path none of them finds an identity segment.
    """
    if not is_origin_form(target):
        return ForwardRefusal("not origin-form", repr(target))
    readings = [urllib_reading(target)]
    readings += [parser.reading(target) for parser in parsers if parser is not None]
    for reading in readings:
        if reading.host is None:
            return ForwardRefusal("unparseable", f"{reading.parser}: {reading.error}")
        if reading.host != METADATA_HOST:
            return ForwardRefusal("another host", f"{reading.parser} reads host {reading.host!r}, "
                                                  f"path {reading.path!r}")
        segment = identity_segment(reading.path)
        if segment is not None:
            return ForwardRefusal("identity segment", f"{reading.parser} reads the path "
                                                      f"{reading.path!r}, segment {segment!r}")
    return None


# RFC 3986, section 2: what may stand in a URI as itself (unreserved, reserved, "%").
_URI_CHARS = "-._~:/?#[]@!$&'()*+,;=%"


def _uri_normal(target: str) -> str:
    """`target` with what RFC 3986 calls equivalent made equal (section 6.2.2): characters a
    URI may not hold raw percent-encoded, percent-encodings in upper case."""
    quoted = urllib.parse.quote(target, safe=_URI_CHARS, encoding="latin-1", errors="replace")
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m[0].upper(), quoted)


def relayed_forms(target: str) -> set[str]:
    """The targets a relay may send for a client's `target`, normalised by `_uri_normal`:
    the same; without a fragment (never sent to a server, RFC 9110 section 4.2.5) or an
    empty query; with its dot segments removed (RFC 3986, section 5.2.4, as urljoin does);
    for an absolute-form target, its path and query as urlsplit reads them."""
    plain = target.partition("#")[0]
    forms = {plain, plain.removesuffix("?")}
    with contextlib.suppress(ValueError):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", plain):
            parts = urllib.parse.urlsplit(plain)
            path = parts.path or "/"
            forms.add(path + "?" + parts.query if parts.query else path)
        resolved = urllib.parse.urlsplit(urllib.parse.urljoin(IMDS_BASE, plain))
        forms.add(resolved.path + "?" + resolved.query if resolved.query else resolved.path)
    return {_uri_normal(form) for form in forms}


def is_relayed_form(received: str, target: str) -> bool:
    """Whether a relay that received `target` may have sent `received` for it."""
    return _uri_normal(received) in relayed_forms(target)


# ---- what a relay may change -------------------------------------------------------------

# RFC 9110, section 7.6.1 (and 11.7 for the proxy credentials a proxy consumes): fields that
# belong to one hop. X-Forwarded-For is removed by the contract's own rule for the token
# endpoint, and IMDS refuses it: a relay may drop it.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "trailer", "proxy-authorization", "proxy-authenticate",
                        "x-forwarded-for"})
# Framing the relay redoes for its own hop: Host names the real IMDS, Content-Length the body.
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})


def _connection_names(headers: Iterable[tuple[str, str]]) -> set[str]:
    return {token.strip().lower() for name, value in headers if name.lower() == "connection"
            for token in value.split(",") if token.strip()}


@dataclass
class RelayCheck:
    added: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    reordered: bool = False
    framing: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.dropped or self.reordered or self.framing)


def relay_differences(sent: H11Request, received: Sequence[Sequence[str]], body: bytes, *,
                      own_host: str) -> RelayCheck:
    """How the fields the metadata stand-in received differ from what the client sent,
    beyond what the contract allows a relay: the client's end-to-end fields, in their
    order, with their values; nothing added but the loop marker and the relay's own
    framing (Host = the real IMDS, a Content-Length that matches the body, a Connection
    about its own hop)."""
    client = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in sent.headers]
    hop = HOP_BY_HOP | _connection_names(client)
    expected = [(n.lower(), v) for n, v in client if n.lower() not in hop | FRAMING]
    got = [(str(n).lower(), str(v)) for n, v in received]
    check = RelayCheck()
    relayed: list[tuple[str, str]] = []
    for name, value in got:
        if name == LOOP_MARKER:
            continue
        if name == "host":
            if value != own_host:
                check.framing.append(f"Host {value!r}, not {own_host!r}")
            continue
        if name == "content-length":
            if value != str(len(body)):
                check.framing.append(f"Content-Length {value!r} for a body of {len(body)}")
            continue
        if name == "transfer-encoding":
            check.framing.append(f"Transfer-Encoding {value!r} (the body is known whole)")
            continue
        if name == "connection" and all(token.strip().lower() in ("keep-alive", "close")
                                        for token in value.split(",")):
            continue  # about the relay's own connection, carrying nothing of the client's
        relayed.append((name, value))
    remaining = list(expected)
    for item in relayed:
        if item in remaining:
            remaining.remove(item)
        else:
            check.added.append(item)
    check.dropped = remaining
    if not check.added and not check.dropped:
        # Fields of the same name keep their order (RFC 9110, section 5.3); the order of
        # fields of different names carries no meaning.
        def by_name(fields: list[tuple[str, str]]) -> dict[str, list[str]]:
            grouped: dict[str, list[str]] = {}
            for name, value in fields:
                grouped.setdefault(name, []).append(value)
            return grouped

        check.reordered = by_name(relayed) != by_name(expected)
    if sum(1 for name, _ in got if name == LOOP_MARKER) != 1:
        check.framing.append("not exactly one loop marker")
    return check
