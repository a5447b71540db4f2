"""A lean HTTP/1.1 transport for httpx: asyncio streams, httptools, a small keep-alive pool.

Why not httpx's default (httpcore): measured here, one exchange through httpcore costs about
1.5 ms of CPU more than the same request on a plain asyncio stream (most of it in anyio's
and httpcore's layers), and importing its asyncio backend adds about 2.5 MB to a sidecar that
runs in every pod. The proxy's outbound traffic is tiny and regular: a form POST to one
token endpoint, or a GET to the node's metadata service, with small answers. This
transport does exactly that, behind the public `httpx.AsyncBaseTransport` interface, so
the rest of the code keeps using httpx's requests, responses, timeouts and exceptions: the
pass-through through `httpx.AsyncClient`, the token exchange through `FormClient` (the
same request handed straight to the transport; through a plain `httpx.AsyncClient` when
the environment names a proxy).

What it supports: http and https (verification by the given SSLContext, SNI from the
request's `sni_hostname` extension, as httpcore does), Content-Length, chunked and
close-delimited answers, keep-alive reuse (a request that fails on a reused connection
before any answer arrived is sent once more on a new one: servers close idle connections
at any time), the connect/read/write timeouts of `httpx.Timeout`, and answers of at most
1 MiB. Errors are httpx's own (ConnectError, ReadTimeout, …) with the cause chained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import httptools
import httpx

from azwi_netproxy.config import exchange_proxies

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES: Final = 1024 * 1024
MAX_IDLE_PER_ORIGIN: Final = 4
_READ_CHUNK: Final = 65536
# The codings httpx always decodes (brotli and zstd need optional packages).
_ACCEPT_ENCODING: Final = "gzip, deflate"
_MAX_URLS: Final = 64

Origin = tuple[str, str, int, str | None]


class _Answer:
    """httptools callbacks collecting one response."""

    __slots__ = (
        "body",
        "complete",
        "head_request",
        "headers",
        "headers_complete",
        "keep_alive",
        "parser",
        "size",
        "status",
        "too_large",
    )

    def __init__(self, *, head_request: bool = False) -> None:
        self.head_request = head_request
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.headers_complete = False
        self.too_large = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        if self.parser is not None:
            self.status = self.parser.get_status_code()
        if self.head_request:
            # A HEAD answer's Content-Length describes a body that is never sent.
            self.complete = True
            if self.parser is not None:
                self.keep_alive = self.parser.should_keep_alive()

    def delimited_by_close(self) -> bool:
        """No Content-Length and no chunked coding: the body ends when the server closes."""
        if self.head_request or self.status in (204, 304) or 100 <= self.status < 200:
            return False
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_RESPONSE_BYTES:
            self.too_large = True
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked here: once the callback returns, the parser is reset for the next message.
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()


class _Connection:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        """Open, and nothing arrived while idle (a server's 408 or a close notice).

        StreamReader has no public view of its buffer; `_buffer` has been its attribute in
        every CPython release with asyncio, and an idle connection with data in it must
        not be reused (httpcore checks readability the same way).
        """
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not getattr(self.reader, "_buffer", b"")
        )

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A reused connection closed before answering: send the request again on a new one."""


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        host = url.host
        port = url.port or (443 if scheme == "https" else 80)
        sni = request.extensions.get("sni_hostname") if scheme == "https" else None
        origin: Origin = (scheme, host, port, sni)
        payload = self._serialise(request, await request.aread())
        # Only requests that are safe to repeat are sent again after a kept-alive
        # connection failed: a POST may have been read before the reset, and the caller
        # (entra.Exchanger) counts and spaces its own attempts.
        attempts = 2 if request.method in ("GET", "HEAD") else 1
        for attempt in range(attempts):
            # The second attempt never takes another pooled connection: it may be stale too.
            connection = self._checkout(origin) if attempt == 0 else None
            if connection is None:
                connection = await self._connect(request, origin, timeouts.get("connect"))
            try:
                return await self._exchange(request, origin, connection, payload, timeouts)
            except _StaleConnection as exc:
                if attempt + 1 == attempts:
                    raise httpx.ReadError(
                        "a kept-alive connection was closed by the server", request=request
                    ) from exc
                log.debug(
                    "a kept-alive connection was closed by the server; sending again",
                    extra={"host": host, "port": port},
                )
                continue
        raise httpx.RemoteProtocolError("the server closed the connection twice", request=request)

    @staticmethod
    def _serialise(request: httpx.Request, body: bytes) -> bytes:
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
        for name, value in request.headers.raw:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        return b"".join(head) + body

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return None

    async def _connect(self, request: httpx.Request, origin: Origin, timeout_s: float | None) -> _Connection:
        scheme, host, port, sni = origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=(sni or host) if context is not None else None,
                    limit=_READ_CHUNK,
                ),
                timeout_s,
            )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}", request=request) from exc
        return _Connection(reader, writer)

    async def _exchange(
        self,
        request: httpx.Request,
        origin: Origin,
        connection: _Connection,
        payload: bytes,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        answer = _Answer(head_request=request.method == "HEAD")
        parser = httptools.HttpResponseParser(answer)
        answer.parser = parser
        received = False
        try:
            connection.writer.write(payload)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for wraps each await in a task
                # of its own (and one more loop turn), on the cold path of every exchange.
                async with asyncio.timeout(timeouts.get("write")):
                    await connection.writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("writing the request timed out", request=request) from exc
            except OSError as exc:
                if connection.reused:
                    raise _StaleConnection from exc
                raise httpx.WriteError(str(exc), request=request) from exc
            while not answer.complete:
                try:
                    async with asyncio.timeout(timeouts.get("read")):
                        data = await connection.reader.read(_READ_CHUNK)
                except TimeoutError as exc:
                    raise httpx.ReadTimeout("reading the response timed out", request=request) from exc
                except OSError as exc:
                    if connection.reused and not received:
                        raise _StaleConnection from exc
                    raise httpx.ReadError(str(exc), request=request) from exc
                if not data:
                    if connection.reused and not received:
                        raise _StaleConnection
                    if answer.headers_complete and answer.delimited_by_close():
                        answer.complete = True  # a close-delimited body ends here
                        break
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection before the response was complete",
                        request=request,
                    )
                received = True
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    raise httpx.RemoteProtocolError("unexpected protocol upgrade", request=request) from exc
                except httptools.HttpParserError as exc:
                    raise httpx.RemoteProtocolError(f"malformed response: {exc}", request=request) from exc
                if answer.too_large:
                    raise httpx.RemoteProtocolError("the response is larger than 1 MiB", request=request)
            answer.status = parser.get_status_code()
        except BaseException:
            connection.close()
            raise
        if answer.keep_alive and not answer.delimited_by_close() and not self._closed and connection.usable():
            idle = self._idle.setdefault(origin, deque())
            if len(idle) < MAX_IDLE_PER_ORIGIN:
                connection.reused = False
                idle.append(connection)
            else:
                connection.close()
        else:
            connection.close()
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            # As a stream, not content=: httpx then decodes Content-Encoding on read, and a
            # pass-through can still take the raw bytes with aiter_raw().
            stream=httpx.ByteStream(b"".join(answer.body)),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def idle_connections(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def __repr__(self) -> str:
        return f"LeanTransport(idle={self.idle_connections()})"


def lean_client(
    *, ssl_context: ssl.SSLContext | None, timeout: httpx.Timeout, **kwargs: Any
) -> httpx.AsyncClient:
    """An httpx client on the lean transport, direct: httpx applies no environment proxy
    to a client given its own transport (see FormClient for the exchange, which does)."""
    return httpx.AsyncClient(
        transport=LeanTransport(ssl_context=ssl_context),
        verify=ssl_context if ssl_context is not None else True,
        trust_env=False,
        timeout=timeout,
        follow_redirects=False,
        **kwargs,
    )


def environment_proxies_set() -> bool:
    """Whether exchanges go through a proxy from the environment, by the rules the start-up
    checks judged them by (config.exchange_proxies)."""
    return bool(exchange_proxies(os.environ))


class FormClient:
    """Form POSTs for the token exchange: httpx requests and responses, without AsyncClient's layers.

    Profiled on the cold path (py-spy), `AsyncClient.post` spent about two thirds of an
    exchange's CPU outside the transport: merging the URL and headers, cookie extraction
    through urllib's Request objects, the auth and redirect flows and a byte chunker. An
    exchange needs none of them (no cookies, auth, redirects or hooks), so the request is
    built as an `httpx.Request` and handed straight to the transport; the answer is an
    `httpx.Response`, read, and errors are httpx's own, as before.

    With a proxy in the environment and `trust_env`, every request goes through a plain
    `httpx.AsyncClient` (httpx's own transports) instead: HTTPS_PROXY, NO_PROXY and their
    precedence are then exactly httpx's. httpx ignores environment proxies on a client
    given a transport of its own, so the lean transport cannot serve that case.
    """

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport,
        timeout: httpx.Timeout,
        headers: Mapping[str, str],
        trust_env: bool = False,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.transport = transport
        self._timeout = timeout
        self._headers = httpx.Headers(
            {"Accept": "*/*", "Accept-Encoding": _ACCEPT_ENCODING, "Connection": "keep-alive", **headers}
        )
        self._urls: dict[str, httpx.URL] = {}
        self._client: httpx.AsyncClient | None = None
        if trust_env and environment_proxies_set():
            self._client = httpx.AsyncClient(
                verify=verify,
                trust_env=True,
                timeout=timeout,
                headers=self._headers,
                follow_redirects=False,
            )

    @property
    def via_environment_proxy(self) -> bool:
        return self._client is not None

    async def post_form(
        self, url: str, form: Mapping[str, str], *, timeout_s: float, extensions: Mapping[str, Any]
    ) -> httpx.Response:
        """POST `form` (urlencoded) to `url` and read the answer.

        `timeout_s` bounds each phase (connect no longer than the client's own connect limit).
        Raises httpx.TimeoutException / httpx.TransportError subclasses, as httpx does.
        """
        connect = self._timeout.connect
        timeouts = {
            "connect": timeout_s if connect is None else min(timeout_s, connect),
            "read": timeout_s,
            "write": timeout_s,
            "pool": timeout_s,
        }
        if self._client is not None:
            return await self._client.post(
                url, data=dict(form), extensions=dict(extensions), timeout=httpx.Timeout(**timeouts)
            )
        request = httpx.Request(
            "POST",
            self._url(url),
            headers=self._headers,
            data=dict(form),
            extensions={**extensions, "timeout": timeouts},
        )
        response = await self.transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _url(self, url: str) -> httpx.URL:
        # Exchanges go to a URL per tenant: parse each once.
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        await self.transport.aclose()


def form_client(
    *, ssl_context: ssl.SSLContext | None, trust_env: bool, timeout: httpx.Timeout, headers: Mapping[str, str]
) -> FormClient:
    """A FormClient on the lean transport."""
    return FormClient(
        transport=LeanTransport(ssl_context=ssl_context),
        timeout=timeout,
        headers=headers,
        trust_env=trust_env,
        verify=ssl_context if ssl_context is not None else True,
    )
