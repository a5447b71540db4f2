"""HTTP/1.1 server on asyncio protocols: bytes ↔ http11, keep-alive, pipelining, timeouts, shutdown.

Per connection: a RequestReader, a queue of parsed requests answered strictly in order,
at most one of them in flight (a cache miss or a pass-through). Every request takes the
same path: parsed by wire, answered by the handler (app.py), serialised by wire. Errors
the server meets itself (a broken request, a crash while answering) are answered by the
handler too, so every error body comes from app.py's one renderer. Timeouts are deadlines
swept once a second rather than timer handles re-armed on every request.

One server may listen on several sockets, each with its own handler (node mode: a listener
inside each pod's network namespace, answered by that pod's app); the deadline sweeper,
the limits and the shutdown order are shared, and closing one listener closes every
connection it accepted.

Connection states and their deadline:
    idle (new connection)      header_timeout_s   (nothing sent yet: slowloris guard)
    idle (after a response)    keepalive_timeout_s
    reading a request          header_timeout_s from its first byte, until it is complete
    answering                  none (the app bounds its own work)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from azwi_netproxy.errors import MalformedRequest, NetproxyError
from azwi_netproxy.proxy.wire import DateHeader, Request, RequestReader, Response, serialize

log = logging.getLogger(__name__)

_MAX_PIPELINE: Final = 32
_LINGER_S: Final = 1.0


class Handler(Protocol):
    def dispatch(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        """The answer now (no I/O needed), or a coroutine that makes it."""
        ...

    def refuse(self, error: NetproxyError) -> Response:
        """The answer to an error the server met itself (a broken request, a crash)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    header_timeout_s: float = 5.0
    keepalive_timeout_s: float = 60.0
    max_connections: int = 1024
    shutdown_grace_s: float = 5.0


class Listener:
    """One listening socket, the handler that answers its connections, and those connections."""

    __slots__ = ("app", "connections", "log_extra", "server")

    def __init__(self, app: Handler, log_extra: dict[str, object] | None = None) -> None:
        self.app = app
        self.connections: set[HttpProtocol] = set()
        self.server: asyncio.Server | None = None
        # What the server's own log lines about this listener's connections carry (node
        # mode: the pod's name).
        self.log_extra = log_extra or {}


@dataclass(slots=True)
class ServerState:
    limits: ServerLimits
    connections: set[HttpProtocol] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    date: DateHeader = field(default_factory=DateHeader)
    shutting_down: bool = False
    rejected_connections: int = 0


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_app",
        "_busy",
        "_closed",
        "_in_flight",
        "_listener",
        "_loop",
        "_queue",
        "_read_paused",
        "_reader",
        "_state",
        "_transport",
        "_write_paused",
        "activity",
        "deadline",
        "quiet_since",
        "seen_activity",
    )

    def __init__(self, listener: Listener, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self._listener = listener
        self._app = listener.app
        self._state = state
        self._loop = loop
        self._reader = RequestReader()
        self._queue: deque[Request | MalformedRequest] = deque()
        self._busy = False
        self._closed = False
        self._read_paused = False
        self._write_paused = False
        self._transport: asyncio.Transport | None = None
        self._in_flight: asyncio.Task[None] | None = None
        # The header-read deadline (a new connection, or a request begun but incomplete).
        self.deadline: float | None = None
        # Bumped on every read and write; the sweeper turns "unchanged for a while" into
        # the keep-alive idle timeout, so answering costs no timer work at all.
        self.activity = 0
        self.seen_activity = 0
        self.quiet_since = 0.0

    # ---- connection lifecycle ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, do not assert.
        self._transport = cast(asyncio.Transport, transport)
        state = self._state
        # The cap is per listener: in node mode one pod's clients cannot use up another's.
        if state.shutting_down or len(self._listener.connections) >= state.limits.max_connections:
            state.rejected_connections += 1
            self._closed = True
            self._transport.abort()
            return
        state.connections.add(self)
        self._listener.connections.add(self)
        self.quiet_since = self._loop.time()
        self.deadline = self.quiet_since + state.limits.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._forget()
        self._queue.clear()
        # Nobody is left to read the answer. A shared token fetch is shielded by the cache
        # and goes on for the other waiters.
        if self._in_flight is not None:
            self._in_flight.cancel()

    # ---- input ----
    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.activity += 1
        reader = self._reader
        was_reading = reader.reading_request
        try:
            requests = reader.feed(data)
        except MalformedRequest as exc:
            self._protocol_error(exc)
            return
        if self._busy or self._queue:
            pass  # answering: no deadline; the header clock starts when the answer is out
        elif reader.reading_request:
            if not was_reading or requests:
                # A new request began in this chunk: its header clock starts now.
                self.deadline = self._loop.time() + self._state.limits.header_timeout_s
        else:
            self.deadline = None
            if len(requests) == 1:
                # The usual case, one whole request on an idle connection: answered at once.
                self._answer(requests[0])
                return
        if requests:
            self._queue.extend(requests)
            self._drain_queue()
            if len(self._queue) > _MAX_PIPELINE and not self._read_paused and self._transport:
                self._read_paused = True
                self._transport.pause_reading()

    def _drain_queue(self) -> None:
        queue = self._queue
        while queue and not self._busy and not self._closed and not self._write_paused:
            item = queue.popleft()
            if isinstance(item, MalformedRequest):
                self._send_protocol_error(item)
                return
            self._answer(item)
        if (
            self._read_paused
            and not self._write_paused
            and len(queue) <= _MAX_PIPELINE // 2
            and not self._closed
            and not any(isinstance(item, MalformedRequest) for item in queue)
        ):
            self._read_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def _answer(self, request: Request) -> None:
        result = self._app.dispatch(request)
        if isinstance(result, Response):
            self._send(request, result)
            return
        self._busy = True
        self.deadline = None
        task = self._loop.create_task(self._answer_later(request, result))
        self._in_flight = task
        self._state.tasks.add(task)
        task.add_done_callback(self._state.tasks.discard)

    async def _answer_later(self, request: Request, pending: Coroutine[Any, Any, Response]) -> None:
        try:
            response = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error while answering", extra=self._listener.log_extra)
            response = self._app.refuse(NetproxyError("unhandled error"))
        self._busy = False
        self._in_flight = None
        if self._closed:
            return
        self._send(request, response)
        self._drain_queue()

    # ---- output ----
    def _send(self, request: Request, response: Response) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        state = self._state
        keep_alive = request.keep_alive and not response.close and not state.shutting_down
        transport.write(
            serialize(
                response,
                date=state.date.value(),
                head=request.method == "HEAD",
                keep_alive=keep_alive,
                http10_keep_alive=keep_alive and request.http_version == "1.0",
            )
        )
        self.activity += 1
        if not keep_alive:
            self._close()
            return
        if self._reader.reading_request and not self._busy and not self._queue:
            # The next request began while this one was answered: its header clock starts now.
            self.deadline = self._loop.time() + state.limits.header_timeout_s

    def _protocol_error(self, exc: MalformedRequest) -> None:
        """Answer the requests parsed before the bad one first, then the error, then close."""
        if self._transport is not None and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()
        if exc.completed or self._busy or self._queue:
            self._queue.extend(exc.completed)
            self._queue.append(exc)
            self._drain_queue()
            return
        self._send_protocol_error(exc)

    def _send_protocol_error(self, exc: MalformedRequest) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        transport.write(
            serialize(self._app.refuse(exc), date=self._state.date.value(), head=False, keep_alive=False)
        )
        self._closed = True
        self._forget()
        # Closing with unread input makes the kernel send a reset, which can destroy the
        # answer before the client reads it (an oversized header, say). Shut our side,
        # drain and drop what still comes for a moment, then close (Go does the same).
        if transport.can_write_eof():
            try:
                transport.write_eof()
                transport.resume_reading()
            except (OSError, RuntimeError):
                transport.close()
                return
            self._loop.call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain_queue()

    def _close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.close()
        self._forget()

    def _forget(self) -> None:
        self._state.connections.discard(self)
        self._listener.connections.discard(self)

    # ---- called by the server ----
    def expire(self) -> None:
        """The deadline passed: a slow or idle client. Close without an answer, as Go does."""
        self._close()

    def abort(self) -> None:
        """Its listener is closed for good (the pod is gone): drop the connection now."""
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.abort()
        self._forget()

    def shutdown(self) -> None:
        """Close now if idle; otherwise finish the request in flight and close after it."""
        if not self._busy and not self._queue and not self._reading_request:
            self._close()

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    @property
    def waiting_for_request(self) -> bool:
        """Idle between requests: what the keep-alive timeout applies to."""
        return not self._busy and not self._queue and not self._reading_request

    @property
    def _reading_request(self) -> bool:
        return self._reader.reading_request


class HttpServer:
    """Owns the listening sockets, the deadline sweeper and the shutdown order."""

    def __init__(self, app: Handler | None = None, limits: ServerLimits | None = None) -> None:
        self._app = app
        self.state = ServerState(limits=limits or ServerLimits())
        self._listeners: set[Listener] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port for the server's own handler; the port bound."""
        assert self._app is not None, "a server without a handler of its own only takes sockets"
        listener = Listener(self._app)
        loop = asyncio.get_running_loop()
        listener.server = await loop.create_server(
            lambda: HttpProtocol(listener, self.state, loop),
            host=host,
            port=port,
            reuse_address=True,
            backlog=1024,
        )
        self._serving(listener)
        sockets = listener.server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def listen(
        self,
        sock: socket.socket,
        app: Handler,
        *,
        backlog: int = 128,
        log_extra: dict[str, object] | None = None,
    ) -> Listener:
        """Serve `app` on an already listening socket (made in another namespace, say).

        The server takes the socket over: closing the listener closes it.
        """
        listener = Listener(app, log_extra)
        loop = asyncio.get_running_loop()
        listener.server = await loop.create_server(
            lambda: HttpProtocol(listener, self.state, loop), sock=sock, backlog=backlog
        )
        self._serving(listener)
        return listener

    def close_listener(self, listener: Listener) -> None:
        """Stop accepting on `listener` and drop every connection it accepted, at once."""
        self._listeners.discard(listener)
        if listener.server is not None:
            listener.server.close()
        for connection in list(listener.connections):
            connection.abort()

    def _serving(self, listener: Listener) -> None:
        self._listeners.add(listener)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        keepalive_s = self.state.limits.keepalive_timeout_s
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for connection in list(self.state.connections):
                if connection.activity != connection.seen_activity:
                    connection.seen_activity = connection.activity
                    connection.quiet_since = now
                if connection.deadline is not None:
                    if now >= connection.deadline:
                        connection.expire()
                elif connection.waiting_for_request and now - connection.quiet_since >= keepalive_s:
                    connection.expire()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight answers finish (bounded), then close everything."""
        state = self.state
        state.shutting_down = True
        servers = [listener.server for listener in self._listeners if listener.server is not None]
        for server in servers:
            server.close()
        for connection in list(state.connections):
            connection.shutdown()
        deadline = time.monotonic() + state.limits.shutdown_grace_s
        while (state.tasks or any(not c.idle for c in state.connections)) and (time.monotonic() < deadline):
            await asyncio.sleep(0.02)
            for connection in list(state.connections):
                connection.shutdown()
        for connection in list(state.connections):
            connection.expire()
        for task in list(state.tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in servers:
            await server.wait_closed()
