"""Sans-IO HTTP/1.1 for the server: bytes in, Request objects out; Response objects in, bytes out.

Rules:
1. No sockets, no event loop: `RequestReader.feed()` takes what arrived and returns the
   requests it completed; the server owns the transport and the timers.
2. httptools callbacks stay trivial (append, set a flag). httptools wraps anything raised
   in a callback in HttpParserCallbackError; our limit checks record why before raising so
   the caller can answer 431/414/413 instead of a bare 400.
3. Any parse error is final for the connection: the server answers once and closes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, cast

import httptools

MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
# Per-header bookkeeping cost counted against MAX_HEADER_BYTES, so the byte limit also
# bounds the number of headers (at most 16 KiB / 64 = 256 empty ones).
_HEADER_OVERHEAD: Final = 64
# Requests repeat byte for byte (an SDK asks for the same token URL with the same
# headers); parsing is a pure function of the bytes at a message boundary, so a chunk
# that was exactly one complete request maps to its parsed Request. Bounded.
MEMO_REQUEST_BYTES: Final = 2048
MEMO_ENTRIES: Final = 256
_VERSIONS: Final = frozenset({"1.0", "1.1"})
# A request line whose protocol llhttp accepts besides HTTP: `METHOD target RTSP/1.0`.
_OTHER_PROTOCOL_LINE: Final = re.compile(rb"(?:^|\n)[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ (?:RTSP|ICE)/")
_TAIL_BYTES: Final = MAX_TARGET_BYTES + 64


class ProtocolError(Exception):
    """The client broke HTTP/1.1 or one of our limits; answer `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        # Requests completed in the same chunk before the bad one: answered first.
        self.completed: list[Request] = []


@dataclass(slots=True)
class Request:
    method: str
    target: bytes
    http_version: str
    # Names lower-cased, values as sent; order kept for pass-through.
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    # The handler's verdict on this request, kept with it: a memoised Request that comes
    # back is judged once. Requests are never mutated otherwise.
    verdict: object = None
    # Set by the handler when it can answer this exact request again without dispatch
    # (see app.TokenApp._fast_hit); returns the answer, or None to take the normal path.
    fast: Callable[[], Response | None] | None = None

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class RequestReader:
    """Feeds bytes to httptools and collects complete requests in arrival order."""

    __slots__ = (
        "_body",
        "_completed",
        "_header_bytes",
        "_headers",
        "_last_name",
        "_limit_error",
        "_memo",
        "_parser",
        "_tail",
        "_target",
        "reading_request",
    )

    def __init__(self, memo: dict[bytes, Request] | None = None) -> None:
        self._memo = memo
        # Made at the first chunk the memo does not know: a client that sends requests
        # seen before (a new connection per token request, say) never needs one.
        self._parser: httptools.HttpRequestParser | None = None
        self._completed: list[Request] = []
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._last_name = b""
        self._limit_error: ProtocolError | None = None
        self._tail = b""
        # True from the first byte of a request until it is complete: the server runs
        # the header-read timeout exactly while this holds (slow bodies are cut too).
        self.reading_request = False

    def feed(self, data: bytes) -> list[Request]:
        """Parse `data`; return the requests it completed (possibly none).

        Raises:
            ProtocolError: malformed input or a limit exceeded.
        """
        at_boundary = not self.reading_request
        memo = self._memo
        if at_boundary and memo is not None:
            known = memo.get(data)
            if known is not None:
                return [known]
        if at_boundary and data:
            self.reading_request = True
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        if self._other_protocol(data):
            raise self._failed(ProtocolError(400, "only HTTP/1.0 and HTTP/1.1 are answered"))
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise self._failed(self._limit_error or ProtocolError(400, "bad request")) from None
        except httptools.HttpParserInvalidMethodError:
            raise self._failed(ProtocolError(400, "invalid method")) from None
        except httptools.HttpParserUpgrade:
            raise self._failed(ProtocolError(400, "protocol upgrade is not supported")) from None
        except httptools.HttpParserError:
            raise self._failed(ProtocolError(400, "malformed request")) from None
        if self._limit_error is not None:
            raise self._failed(self._limit_error)
        done, self._completed = self._completed, []
        if (
            memo is not None
            and at_boundary
            and len(done) == 1
            and not self.reading_request
            and len(data) <= MEMO_REQUEST_BYTES
        ):
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[data] = done[0]
        return done

    def _other_protocol(self, data: bytes) -> bool:
        """Whether a request line in `data` names RTSP or ICE, which llhttp also parses and
        reports as HTTP/1.0 (httptools does not say which protocol a line named).

        Only chunks holding "RTSP/" or "ICE/" are looked at (a few bytes of the previous
        chunk are kept, for a line split between two). A body line that looks like such
        a request line is refused too: nothing IMDS answers carries one.
        """
        tail, self._tail = self._tail, data[-_TAIL_BYTES:]
        seam = tail[-4:] + data[:4]
        if not any(name in part for name in (b"RTSP/", b"ICE/") for part in (data, seam)):
            return False
        return _OTHER_PROTOCOL_LINE.search(tail + data) is not None

    def _failed(self, error: ProtocolError) -> ProtocolError:
        error.completed, self._completed = self._completed, []
        return error

    def _fail(self, status: int, reason: str) -> None:
        self._limit_error = ProtocolError(status, reason)
        raise self._limit_error

    # ---- httptools callbacks ----
    def on_message_begin(self) -> None:
        self.reading_request = True
        self._target = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > MAX_TARGET_BYTES:
            self._fail(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + _HEADER_OVERHEAD
        if self._header_bytes > MAX_HEADER_BYTES:
            self._fail(431, "request headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # CONTRACT.md: only HTTP/1.0 and 1.1 are answered. httptools reads a request line
        # without a version as HTTP/0.9 *with* the header lines that follow it: the shape
        # a CRLF injected into an app's URL (an SSRF) produces. Refused before any body.
        parser = cast(httptools.HttpRequestParser, self._parser)
        version = parser.get_http_version()
        if version not in _VERSIONS:
            self._fail(400, "only HTTP/1.0 and HTTP/1.1 are answered")
        # RFC 9112, section 3.2: a 400 for an HTTP/1.1 request without a Host header, and
        # for any request with more than one (Go's server, upstream's, does the same).
        hosts = sum(1 for name, _ in self._headers if name == b"host")
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._fail(400, "a request needs exactly one Host header")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        if sum(map(len, self._body)) > MAX_BODY_BYTES:
            self._fail(413, "request body too large")

    def on_message_complete(self) -> None:
        parser = cast(httptools.HttpRequestParser, self._parser)  # set: it is calling us
        self._completed.append(
            Request(
                method=parser.get_method().decode("ascii", "replace"),
                target=self._target,
                http_version=parser.get_http_version(),
                headers=self._headers,
                body=b"".join(self._body),
                keep_alive=parser.should_keep_alive(),
            )
        )
        self.reading_request = False


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json; charset=utf-8"
    headers: list[tuple[bytes, bytes]] | None = None
    # Close the connection after this response (parse errors, shutdown).
    close: bool = False
    # The serialised bytes and what they were serialised for (date second, keep-alive,
    # HEAD): a reused Response (a cache hit within the same second) is not rendered twice.
    wire: bytes | None = None
    wire_for: tuple[int, bool, bool, bool] | None = None
    # The same for the fast path's two cases (an HTTP/1.1 GET kept alive, or with
    # `Connection: close`), which need no check.
    keep_alive_wire: bytes | None = None
    close_wire: bytes | None = None


_REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}
SERVER_HEADER: Final = b"azwi-netproxy"


class DateHeader:
    """The Date header value, formatted at most once a second (it is on every response)."""

    __slots__ = ("_value", "second")

    def __init__(self) -> None:
        self.second = -1
        self._value = b""

    def value(self, now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        second = int(now)
        if second != self.second:
            self.second = second
            # RFC 9110 IMF-fixdate; %a/%b are English in the C locale we never change.
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second)).encode()
        return self._value


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = _REASONS.get(status, b"Unknown")
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        _STATUS_LINES[status] = line
    return line


def serialize(
    response: Response,
    *,
    date: bytes,
    head: bool,
    keep_alive: bool,
    http10_keep_alive: bool = False,
) -> bytes:
    """Render a response; for HEAD the body is left out but its length is kept."""
    parts = [
        _status_line(response.status),
        b"Content-Type: ",
        response.content_type,
        b"\r\nContent-Length: %d\r\nDate: " % len(response.body),
        date,
        b"\r\nServer: " + SERVER_HEADER + b"\r\n",
    ]
    if response.headers:
        for name, value in response.headers:
            parts.append(name + b": " + value + b"\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10_keep_alive:
        # HTTP/1.0 closes by default; say that this connection stays open.
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(response.body)
    return b"".join(parts)
