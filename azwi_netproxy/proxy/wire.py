"""Sans-IO HTTP/1.1 for the server: bytes in, Request objects out; Response objects in, bytes out.

Rules:
1. No sockets, no event loop: `RequestReader.feed()` takes what arrived and returns the
   requests it completed; the server owns the transport and the timers.
2. httptools callbacks stay trivial (append, set a flag). httptools wraps anything raised
   in a callback in HttpParserCallbackError; our checks record their error before raising,
   so the caller gets our MalformedRequest (413/414/431/400), not a bare parser error.
3. Any parse error is final for the connection: the server answers once and closes.
4. Only HTTP/1.0 and HTTP/1.1 are read (CONTRACT.md), with exactly one Host in HTTP/1.1.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import httptools

from azwi_netproxy.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    MalformedRequest,
    TargetTooLong,
)

MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
# Per-header bookkeeping cost counted against MAX_HEADER_BYTES, so the byte limit also
# bounds the number of headers (at most 16 KiB / 64 = 256 empty ones).
_HEADER_OVERHEAD: Final = 64
_VERSIONS: Final = frozenset({"1.0", "1.1"})
MSG_VERSION: Final = "only HTTP/1.0 and HTTP/1.1 are answered"
# A request line whose protocol llhttp accepts besides HTTP: `METHOD target RTSP/1.0`.
_OTHER_PROTOCOL_LINE: Final = re.compile(rb"(?:^|\n)[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ (?:RTSP|ICE)/")
_TAIL_BYTES: Final = MAX_TARGET_BYTES + 64
# httptools hands the method over as bytes; the usual ones are decoded once.
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


@dataclass(slots=True)
class Request:
    method: str
    target: bytes
    http_version: str
    # Names lower-cased, values as sent; order kept for pass-through.
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class RequestReader:
    """Feeds bytes to httptools and collects complete requests in arrival order."""

    __slots__ = (
        "_body",
        "_completed",
        "_header_bytes",
        "_headers",
        "_hosts",
        "_limit_error",
        "_parser",
        "_tail",
        "_target",
        "reading_request",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._completed: list[Request] = []
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._hosts = 0
        self._body: list[bytes] = []
        self._limit_error: MalformedRequest | None = None
        self._tail = b""
        # True from the first byte of a request until it is complete: the server runs
        # the header-read timeout exactly while this holds (slow bodies are cut too).
        self.reading_request = False

    def feed(self, data: bytes) -> list[Request]:
        """Parse `data`; return the requests it completed (possibly none).

        Raises:
            MalformedRequest: malformed input or a limit exceeded; its `completed` holds
                the requests the same bytes completed before the bad one.
        """
        # find, not `in`: `bytes in bytes` first tries the needle as an integer, and the
        # TypeError it raises and clears costs more than the search.
        if (
            data.find(b"RTSP/") != -1 or data.find(b"ICE/") != -1 or (self._tail and self._straddles(data))
        ) and _OTHER_PROTOCOL_LINE.search(self._tail + data) is not None:
            raise self._failed(MalformedRequest(MSG_VERSION))
        if data:
            self.reading_request = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise self._failed(self._limit_error or MalformedRequest("bad request")) from None
        except httptools.HttpParserInvalidMethodError:
            raise self._failed(MalformedRequest("invalid method")) from None
        except httptools.HttpParserUpgrade:
            raise self._failed(MalformedRequest("protocol upgrade is not supported")) from None
        except httptools.HttpParserError:
            raise self._failed(MalformedRequest("malformed request")) from None
        if self.reading_request:
            # A request line split between chunks is looked at whole with the next one.
            self._tail = data[-_TAIL_BYTES:]
        elif self._tail:
            self._tail = b""
        done = self._completed
        if done:
            self._completed = []
        return done

    def _straddles(self, data: bytes) -> bool:
        """Whether "RTSP/" or "ICE/" could run across the end of the previous chunk.

        llhttp also parses request lines naming RTSP or ICE and reports them as HTTP/1.0
        (httptools does not say which protocol a line named): such lines are refused by
        feed, which looks at a chunk whole only when it holds one of those names.
        """
        seam = self._tail[-4:] + data[:4]
        return b"RTSP/" in seam or b"ICE/" in seam

    def _failed(self, error: MalformedRequest) -> MalformedRequest:
        error.completed, self._completed = self._completed, []
        return error

    def _fail(self, error: MalformedRequest) -> None:
        self._limit_error = error
        raise error

    # ---- httptools callbacks ----
    # No on_message_begin: a message's state is reset when the previous one completes
    # (each callback costs a Python call on every request), and its URL always comes first.
    def on_url(self, url: bytes) -> None:
        self.reading_request = True
        self._target += url
        if len(self._target) > MAX_TARGET_BYTES:
            self._fail(TargetTooLong("request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + _HEADER_OVERHEAD
        if self._header_bytes > MAX_HEADER_BYTES:
            self._fail(HeadersTooLarge("request headers too large"))
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        if sum(map(len, self._body)) > MAX_BODY_BYTES:
            self._fail(BodyTooLarge("request body too large"))

    def on_message_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        # CONTRACT.md: only HTTP/1.0 and 1.1 are answered. httptools reads a request line
        # without a version as HTTP/0.9 *with* the header lines that follow it: the shape
        # a CRLF injected into an app's URL (an SSRF) produces. (Checked here rather than
        # in on_headers_complete, a callback fewer per request: a body is at most 64 KiB.)
        if version not in _VERSIONS:
            self._fail(MalformedRequest(MSG_VERSION))
        # RFC 9112, section 3.2: a 400 for an HTTP/1.1 request without a Host header, and
        # for any request with more than one (Go's server, upstream's, does the same).
        hosts = self._hosts
        if hosts != 1 and (hosts or version == "1.1"):
            self._fail(MalformedRequest("a request needs exactly one Host header"))
        method = parser.get_method()
        body = self._body
        self._completed.append(
            Request(
                _METHODS.get(method) or method.decode("ascii", "replace"),
                self._target,
                version,
                self._headers,
                b"".join(body) if body else b"",
                parser.should_keep_alive(),
            )
        )
        if body:
            self._body = []
        self._target = b""
        self._headers = []
        self._header_bytes = 0
        self._hosts = 0
        self.reading_request = False


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json; charset=utf-8"
    headers: list[tuple[bytes, bytes]] | None = None
    # Close the connection after this response (parse errors, shutdown).
    close: bool = False


SERVER_HEADER: Final = b"azwi-netproxy"
_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in HTTPStatus
}
_PLAIN: Final = (
    b"%sContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\nServer: " + SERVER_HEADER + b"\r\n\r\n%s"
)


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


def serialize(
    response: Response,
    *,
    date: bytes,
    head: bool,
    keep_alive: bool,
    http10_keep_alive: bool = False,
) -> bytes:
    """Render a response; for HEAD the body is left out but its length is kept."""
    status = response.status
    body = response.body
    status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
    if keep_alive and not http10_keep_alive and not head and not response.headers:
        # The usual answer, a keep-alive one without headers of its own: one formatting.
        return _PLAIN % (status_line, response.content_type, len(body), date, body)
    parts = [
        status_line,
        b"Content-Type: " + response.content_type,
        b"\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n" % (len(body), date, SERVER_HEADER),
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
        parts.append(body)
    return b"".join(parts)
