"""The HTTP/1.1 server on real loopback sockets, and the token app behind it, in-process.

Name: test_server
Scope: one event loop per test, parametrised over asyncio and uvloop (anyio's conftest
    style: the uvloop case is skipped with a reason when uvloop cannot be imported). Each
    test starts an HttpServer on 127.0.0.1:0 and talks to it with raw request bytes
    (uvicorn's test_http.py style).
Depends: azwi_netproxy.proxy.server, azwi_netproxy.proxy.app with a TokenCache whose fetcher is a
    hand-written fake (no network), a fake pass-through.

Only the timeout tests wait on the clock: the server sweeps deadlines once a second, so
they use 0.3 s limits and bound every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from support.loops import LOOP_FACTORIES, runner

from azwi_netproxy.errors import (
    IdentityRejected,
    NetproxyError,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from azwi_netproxy.identitymap import IdentityMap, parse_identity_map
from azwi_netproxy.logs import AccessLog
from azwi_netproxy.proxy import imds
from azwi_netproxy.proxy.app import TokenApp, error_response
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.metrics import Metrics
from azwi_netproxy.proxy.passthrough import Passthrough
from azwi_netproxy.proxy.router import Router
from azwi_netproxy.proxy.server import HttpProtocol, HttpServer, ServerLimits
from azwi_netproxy.proxy.tokens import CacheKey, Token
from azwi_netproxy.proxy.wire import MAX_TARGET_BYTES, Request, Response

T = TypeVar("T")



@pytest.fixture(params=LOOP_FACTORIES)
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Name: run. Scope: function. Runs a coroutine on a fresh loop from the parametrised factory."""
    yield from runner(request.param)


# ---- raw requests -----------------------------------------------------------------------

SYNC_1 = b"GET /sync/1 HTTP/1.1\r\nHost: x\r\n\r\n"
SYNC_2 = b"GET /sync/2 HTTP/1.1\r\nHost: x\r\n\r\n"
SYNC_3 = b"GET /sync/3 HTTP/1.1\r\nHost: x\r\n\r\n"
SLOW_1 = b"GET /slow/1 HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD_SYNC = b"HEAD /sync/1 HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE_SYNC = b"GET /sync/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HTTP10_SYNC = b"GET /sync/1 HTTP/1.0\r\n\r\n"
HTTP10_KEEPALIVE_SYNC = b"GET /sync/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
BOOM = b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
MALFORMED = b"GET / HTTP/1.1\r\nHost: a\nb\r\n\r\n"
INVALID_METHOD = b"FOO /sync/1 HTTP/1.1\r\nHost: x\r\n\r\n"
LONG_TARGET = b"GET /" + b"a" * (MAX_TARGET_BYTES + 1) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
BIG_HEADERS = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 4096) for i in range(6)) + b"\r\n"
PARTIAL = b"GET /sync/1 HTTP/1.1\r\nHost:"

TOKEN_TARGET = b"/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
TOKEN_GET = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
TOKEN_NO_METADATA = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
TOKEN_METADATA_FALSE = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: false\r\n\r\n"
TOKEN_METADATA_TWICE = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nMetadata: true\r\n\r\n"
TOKEN_METADATA_UPPER = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: TRUE\r\n\r\n"
TOKEN_FORWARDED = b"GET " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n"
TOKEN_POST = b"POST " + TOKEN_TARGET + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n"
TOKEN_NO_RESOURCE = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
TOKEN_UPPER_PATH = (
    b"GET /METADATA/identity/oauth2/token/?api-version=1&resource=https%3A%2F%2Fvault.azure.net"
    b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
)
NEAR_MISS = b"GET /metadata/%69dentity/oauth2/token?api-version=1&resource=x HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
INSTANCE = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
INSTANCE_ABSOLUTE = b"GET http://other-host/metadata/instance HTTP/1.1\r\nHost: other-host\r\nMetadata: true\r\n\r\n"
# The shape a CRLF injected into an app's URL produces: no version, then header lines.
HTTP09_TOKEN = b"GET /metadata/identity/oauth2/token?api-version=1&resource=x\r\nMetadata: true\r\n\r\n"
HTTP20_TOKEN = b"GET /metadata/identity/oauth2/token?api-version=1&resource=x HTTP/2.0\r\nMetadata: true\r\n\r\n"
READYZ = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"

NOW = 1_700_000_000
TENANT = "00000000-0000-0000-0000-00000000000a"
DEFAULT = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
LISTED = "11111111-1111-1111-1111-111111111111"
UNLISTED = "99999999-9999-9999-9999-999999999999"
AUTHORITY = "https://login.example.test"

FAST = ServerLimits(header_timeout_s=5.0, keepalive_timeout_s=60.0, shutdown_grace_s=2.0)


# ---- client -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head: bool = False, timeout: float = 5.0) -> Reply:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = b"" if head else await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return Reply(int(status_line.split(" ")[1]), headers, body)

    async def eof(self, timeout: float = 3.0) -> bytes:
        """Wait for the server to close; return whatever it sent before."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return b""


@dataclass
class Clients:
    port: int
    conns: list[Conn] = field(default_factory=list)

    async def open(self) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.conns:
            conn.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(app: Any, limits: ServerLimits = FAST) -> AsyncIterator[tuple[HttpServer, Clients]]:
    server = HttpServer(app, limits)
    port = await server.start("127.0.0.1", 0)
    clients = Clients(port)
    try:
        yield server, clients
    finally:
        await clients.close()
        await server.shutdown()


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Let the loop run until `predicate` holds (bounded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ---- a fake handler with behaviour ------------------------------------------------------


class FakeHandler:
    """Answers /sync/* at once, /slow/* when `release` is set, /yield/* after one loop turn,
    /big/* with a large body, /boom by raising inside the coroutine."""

    def __init__(self, big_body: int = 32 * 1024) -> None:
        self.seen: list[bytes] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished: list[bytes] = []
        self._big = big_body

    def dispatch(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        target = request.target
        self.seen.append(target)
        if target.startswith(b"/slow"):
            return self._slow(target)
        if target.startswith(b"/yield"):
            return self._yield(target)
        if target.startswith(b"/big"):
            return Response(200, target + b"|" + b"x" * self._big, b"text/plain")
        if target.startswith(b"/boom"):
            return self._boom()
        return Response(200, b"sync:" + target, b"text/plain")

    async def _slow(self, target: bytes) -> Response:
        self.started.set()
        await self.release.wait()
        self.finished.append(target)
        return Response(200, b"slow:" + target, b"text/plain")

    async def _yield(self, target: bytes) -> Response:
        await asyncio.sleep(0)
        return Response(200, b"yield:" + target, b"text/plain")

    async def _boom(self) -> Response:
        await asyncio.sleep(0)
        raise RuntimeError("secret internals")

    def refuse(self, error: NetproxyError) -> Response:
        return error_response(error)


# ---- keep-alive, pipelining, versions ---------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (server, clients):
            conn = await clients.open()
            for request, body in ((SYNC_1, b"sync:/sync/1"), (SLOW_1, b"slow:/slow/1"), (SYNC_2, b"sync:/sync/2")):
                handler.release.set()
                await conn.send(request)
                reply = await conn.reply()
                assert (reply.status, reply.body) == (200, body)
                assert "connection" not in reply.headers
                assert reply.headers["server"] == "azwi-netproxy"
                assert reply.headers["date"].endswith("GMT")
            assert len(server.state.connections) == 1

    run(scenario())


def test_pipelined_requests_are_answered_in_order(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (_, clients):
            conn = await clients.open()
            await conn.send(SLOW_1 + SYNC_2 + SYNC_3)
            await asyncio.wait_for(handler.started.wait(), 3)
            for _ in range(20):
                await asyncio.sleep(0)
            # The later requests wait for the first: nothing after it was even dispatched.
            assert handler.seen == [b"/slow/1"]
            handler.release.set()
            bodies = [(await conn.reply()).body for _ in range(3)]
            assert bodies == [b"slow:/slow/1", b"sync:/sync/2", b"sync:/sync/3"]

    run(scenario())


def test_pipelined_requests_split_across_sends(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (_, clients):
            conn = await clients.open()
            await conn.send(SLOW_1 + SYNC_2[:10])
            await asyncio.wait_for(handler.started.wait(), 3)
            await conn.send(SYNC_2[10:] + b"GET /yield/3 HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
            handler.release.set()
            bodies = [(await conn.reply()).body for _ in range(3)]
            assert bodies == [b"slow:/slow/1", b"sync:/sync/2", b"yield:/yield/3"]

    run(scenario())


def test_http10_closes_by_default(run: Any) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (_, clients):
            conn = await clients.open()
            await conn.send(HTTP10_SYNC)
            reply = await conn.reply()
            assert reply.status == 200
            assert reply.headers["connection"] == "close"
            assert await conn.eof() == b""

    run(scenario())


def test_http10_keep_alive_is_honoured(run: Any) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (server, clients):
            conn = await clients.open()
            for _ in range(2):
                await conn.send(HTTP10_KEEPALIVE_SYNC)
                reply = await conn.reply()
                assert reply.status == 200
                assert reply.headers["connection"] == "keep-alive"
            assert len(server.state.connections) == 1

    run(scenario())


def test_connection_close_is_honoured(run: Any) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (server, clients):
            conn = await clients.open()
            await conn.send(CLOSE_SYNC + SYNC_2)
            reply = await conn.reply()
            assert reply.headers["connection"] == "close"
            assert await conn.eof() == b""  # the pipelined request after it is not answered
            await until(lambda: not server.state.connections)

    run(scenario())


def test_head_has_the_get_length_and_no_body(run: Any) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (_, clients):
            conn = await clients.open()
            await conn.send(HEAD_SYNC + SYNC_2)
            head = await conn.reply(head=True)
            assert head.status == 200
            assert head.headers["content-length"] == str(len(b"sync:/sync/1"))
            # Had the HEAD answer carried a body, this would not parse as the next status line.
            following = await conn.reply()
            assert (following.status, following.body) == (200, b"sync:/sync/2")

    run(scenario())


def test_unhandled_error_in_the_handler_is_a_generic_500(run: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (_, clients):
            conn = await clients.open()
            await conn.send(BOOM + SYNC_2)
            reply = await conn.reply()
            assert reply.status == 500
            assert b"secret internals" not in reply.body
            assert reply.json()["error"] == "internal_error"
            assert (await conn.reply()).body == b"sync:/sync/2"  # the connection survives

    with caplog.at_level(logging.ERROR, logger="azwi_netproxy"):
        run(scenario())
    assert any("unhandled error" in record.getMessage() for record in caplog.records)


# ---- bad input --------------------------------------------------------------------------

BAD_REQUESTS = [
    (MALFORMED, 400, "malformed"),
    (INVALID_METHOD, 400, "invalid-method"),
    (LONG_TARGET, 414, "target-over-8k"),
    (BIG_HEADERS, 431, "headers-over-limit"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "tls-handshake"),
]


@pytest.mark.parametrize(
    ("data", "status"),
    [(d, s) for d, s, _ in BAD_REQUESTS],
    ids=[name for *_, name in BAD_REQUESTS],
)
def test_bad_request_is_answered_once_then_closed(run: Any, data: bytes, status: int) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (server, clients):
            conn = await clients.open()
            await conn.send(data)
            reply = await conn.reply()
            assert reply.status == status
            assert reply.headers["connection"] == "close"
            assert reply.json()["error"] == "invalid_request"
            assert await conn.eof() == b""
            assert handler.seen == []
            await until(lambda: not server.state.connections)

    run(scenario())


def test_requests_before_a_bad_one_are_answered_first(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (_, clients):
            conn = await clients.open()
            await conn.send(SLOW_1)
            await asyncio.wait_for(handler.started.wait(), 3)
            await conn.send(MALFORMED)
            for _ in range(20):
                await asyncio.sleep(0)
            handler.release.set()
            assert (await conn.reply()).body == b"slow:/slow/1"
            assert (await conn.reply()).status == 400
            assert await conn.eof() == b""

    run(scenario())


def test_good_request_in_the_same_packet_as_a_bad_one_is_answered_first(run: Any) -> None:
    # A pipelining client sends both in one segment; answering only the 400 would make the
    # client read it as the answer to its good request.
    async def scenario() -> None:
        async with serving(FakeHandler()) as (_, clients):
            conn = await clients.open()
            await conn.send(SYNC_1 + MALFORMED)
            first = await conn.reply()
            assert (first.status, first.body) == (200, b"sync:/sync/1")
            assert (await conn.reply()).status == 400
            assert await conn.eof() == b""

    run(scenario())


# ---- timeouts ---------------------------------------------------------------------------


def test_header_read_timeout_closes_slow_and_silent_clients(run: Any) -> None:
    async def scenario() -> None:
        limits = ServerLimits(header_timeout_s=0.3, keepalive_timeout_s=60.0, shutdown_grace_s=1.0)
        loop = asyncio.get_running_loop()
        async with serving(FakeHandler(), limits) as (server, clients):
            silent = await clients.open()
            partial = await clients.open()
            await partial.send(PARTIAL)
            begun = loop.time()
            assert await partial.eof(timeout=2.5) == b""  # closed without an answer, as Go does
            assert await silent.eof(timeout=2.5) == b""
            assert loop.time() - begun < 2.0
            await until(lambda: not server.state.connections)

    run(scenario())


def test_idle_keep_alive_timeout_but_not_while_answering(run: Any) -> None:
    async def scenario() -> None:
        limits = ServerLimits(header_timeout_s=0.3, keepalive_timeout_s=0.3, shutdown_grace_s=1.0)
        loop = asyncio.get_running_loop()
        handler = FakeHandler()
        async with serving(handler, limits) as (_, clients):
            idle = await clients.open()
            await idle.send(SYNC_1)
            assert (await idle.reply()).status == 200
            busy = await clients.open()
            await busy.send(SLOW_1)
            await asyncio.wait_for(handler.started.wait(), 3)
            begun = loop.time()
            # Idleness is seen by the once-a-second sweep (no timer per request): the first
            # sweep notes the last activity, a later one closes, so allow two ticks.
            assert await idle.eof(timeout=3.5) == b""
            assert loop.time() - begun < 3.0
            # The sweep that closed the idle one has passed the busy one: still open.
            handler.release.set()
            reply = await busy.reply()
            assert (reply.status, reply.body) == (200, b"slow:/slow/1")

    run(scenario())


def test_next_request_started_during_an_answer_does_not_cut_the_answer(run: Any) -> None:
    # The docstring's table: while answering there is no deadline. A pipelining client
    # that has begun its next request must still get the answer in flight.
    async def scenario() -> None:
        limits = ServerLimits(header_timeout_s=0.3, keepalive_timeout_s=60.0, shutdown_grace_s=1.0)
        handler = FakeHandler()
        async with serving(handler, limits) as (_, clients):
            conn = await clients.open()
            await conn.send(SLOW_1)
            await asyncio.wait_for(handler.started.wait(), 3)
            await conn.send(PARTIAL)
            await asyncio.sleep(1.3)  # past at least one sweep with the header deadline passed
            handler.release.set()
            reply = await conn.reply(timeout=2)
            assert (reply.status, reply.body) == (200, b"slow:/slow/1")

    run(scenario())


# ---- connection limits and flow control -------------------------------------------------


def test_max_connections(run: Any) -> None:
    async def scenario() -> None:
        limits = ServerLimits(max_connections=2, shutdown_grace_s=1.0)
        async with serving(FakeHandler(), limits) as (server, clients):
            first, second = await clients.open(), await clients.open()
            for conn in (first, second):
                await conn.send(SYNC_1)
                assert (await conn.reply()).status == 200
            third = await clients.open()
            assert await third.eof() == b""
            assert server.state.rejected_connections == 1
            for conn in (first, second):
                await conn.send(SYNC_2)
                assert (await conn.reply()).body == b"sync:/sync/2"

    run(scenario())


def test_big_pipelined_burst_pauses_and_resumes(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"pause_writing": 0, "resume_writing": 0}
    for name in calls:
        original = getattr(HttpProtocol, name)

        def counted(self: HttpProtocol, _original: Any = original, _name: str = name) -> None:
            calls[_name] += 1
            _original(self)

        monkeypatch.setattr(HttpProtocol, name, counted)
    count = 200

    async def scenario() -> None:
        handler = FakeHandler(big_body=64 * 1024)
        async with serving(handler) as (_, clients):
            conn = await clients.open()
            burst = b"".join(
                b"GET /%s/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (b"yield" if i % 7 == 0 else b"big", i)
                for i in range(count)
            )
            await conn.send(burst)
            # Read nothing until the server has had to stop writing (the socket buffers are full).
            await until(lambda: calls["pause_writing"] > 0, timeout=10)
            for i in range(count):
                reply = await conn.reply(timeout=10)
                assert reply.status == 200
                assert reply.body.split(b"|")[0].split(b":")[-1].endswith(b"/%d" % i)
            await conn.send(SYNC_1)
            assert (await conn.reply()).body == b"sync:/sync/1"

    run(scenario())
    assert calls["resume_writing"] >= 1


def test_deep_pipeline_of_async_answers_keeps_order(run: Any) -> None:
    async def scenario() -> None:
        async with serving(FakeHandler()) as (_, clients):
            conn = await clients.open()
            count = 150  # well past the 32-request queue bound: reading pauses and resumes
            await conn.send(b"".join(b"GET /yield/%d HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n" % i for i in range(count)))
            bodies = [(await conn.reply()).body for _ in range(count)]
            assert bodies == [b"yield:/yield/%d" % i for i in range(count)]

    run(scenario())


# ---- shutdown and disconnects -----------------------------------------------------------


def test_shutdown_finishes_the_request_in_flight_then_stops(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        server = HttpServer(handler, ServerLimits(shutdown_grace_s=5.0))
        port = await server.start("127.0.0.1", 0)
        clients = Clients(port)
        try:
            busy, idle = await clients.open(), await clients.open()
            await idle.send(SYNC_1)
            await idle.reply()
            await busy.send(SLOW_1)
            await asyncio.wait_for(handler.started.wait(), 3)
            stopping = asyncio.create_task(server.shutdown())
            assert await idle.eof() == b""  # idle connections close at once
            with pytest.raises(OSError):
                await clients.open()
            assert not stopping.done()
            handler.release.set()
            reply = await busy.reply()
            assert (reply.status, reply.body) == (200, b"slow:/slow/1")
            assert reply.headers["connection"] == "close"
            assert await busy.eof() == b""
            await asyncio.wait_for(stopping, 3)
            assert server.state.tasks == set()
            assert server.state.connections == set()
        finally:
            await clients.close()

    run(scenario())


def test_shutdown_grace_is_bounded(run: Any) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        server = HttpServer(handler, ServerLimits(shutdown_grace_s=0.3))
        port = await server.start("127.0.0.1", 0)
        clients = Clients(port)
        try:
            busy = await clients.open()
            await busy.send(SLOW_1)
            await asyncio.wait_for(handler.started.wait(), 3)
            await asyncio.wait_for(server.shutdown(), 3)  # never released: cut after the grace
            assert await busy.eof() == b""
            await until(lambda: not server.state.tasks)
        finally:
            await clients.close()

    run(scenario())


def test_disconnect_during_a_pending_answer(run: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        handler = FakeHandler()
        async with serving(handler) as (server, clients):
            conn = await clients.open()
            await conn.send(SLOW_1 + SYNC_2)
            await asyncio.wait_for(handler.started.wait(), 3)
            conn.writer.close()
            await conn.writer.wait_closed()
            await until(lambda: not server.state.connections)
            # Nobody is left to read the answer: its task is cancelled with the connection.
            await until(lambda: not server.state.tasks)
            handler.release.set()
            assert handler.finished == []
            assert handler.seen == [b"/slow/1"]  # the queued request died with its connection
            fresh = await clients.open()
            await fresh.send(SYNC_3)
            assert (await fresh.reply()).body == b"sync:/sync/3"

    with caplog.at_level(logging.WARNING):
        run(scenario())
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- the token app behind the server ----------------------------------------------------


class FakeFetcher:
    """The cache's fetcher: returns tokens (or raises `error`), counting calls per key."""

    def __init__(self) -> None:
        self.keys: list[CacheKey] = []
        self.error: BaseException | None = None

    async def __call__(self, key: CacheKey) -> Token:
        self.keys.append(key)
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return Token(
            access_token=f"eyJ.{key.client_id}.{len(self.keys)}",
            token_type="Bearer",
            issued_at=NOW,
            expires_on=NOW + 3600,
            ext_expires_on=NOW + 7200,
            refresh_on=NOW + 3000,
        )


class FakePassthrough:
    """Stands in for the real IMDS pass-through; records what it was asked to forward."""

    nonce = b"not-used"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def is_own_loop(self, request: Request) -> bool:
        return False

    async def forward(self, request: Request, path: str, query: str) -> Response:
        self.calls.append((request.method, path, query))
        await asyncio.sleep(0)
        return Response(200, b'{"compute":{"location":"westeurope"}}')


@dataclass
class AppParts:
    app: TokenApp
    fetcher: FakeFetcher
    passthrough: FakePassthrough | None
    metrics: Metrics
    cache: TokenCache


def _make_app(
    *,
    passthrough: bool = True,
    only_listed: bool = False,
    real_passthrough: Passthrough | None = None,
    access_log: AccessLog | None = None,
    clock: Callable[[], float] = lambda: float(NOW),
) -> AppParts:
    identity_map = (
        parse_identity_map(f"onlyListed: true\nidentities:\n  - clientID: {LISTED}\n") if only_listed else IdentityMap()
    )
    fetcher = FakeFetcher()
    cache = TokenCache(fetcher, clock=clock)
    fake_passthrough = FakePassthrough() if passthrough else None
    metrics = Metrics()
    app = TokenApp(
        router=Router(default_client_id=DEFAULT, tenant_id=TENANT, identity_map=identity_map),
        cache=cache,
        endpoint_id=AUTHORITY,
        passthrough=real_passthrough or fake_passthrough,  # type: ignore[arg-type]
        metrics=metrics,
        access_log=access_log or AccessLog(enabled=False, schedule_flush=asyncio.get_running_loop().call_soon),
    )
    return AppParts(app, fetcher, fake_passthrough, metrics, cache)


async def _ask(parts: AppParts, *requests: bytes) -> list[Reply]:
    async with serving(parts.app) as (_, clients):
        conn = await clients.open()
        replies = []
        for request in requests:
            await conn.send(request)
            replies.append(await conn.reply())
        await parts.cache.aclose()
        return replies


def app_test(
    run: Any, scenario: Callable[[AppParts], Awaitable[None]], **options: Any
) -> None:
    async def main() -> None:
        await scenario(_make_app(**options))

    run(main())


def test_token_miss_then_hit(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        first, second = await _ask(parts, TOKEN_GET, TOKEN_GET)
        assert parts.fetcher.keys == [CacheKey(AUTHORITY, TENANT, DEFAULT, "https://vault.azure.net/.default")]
        for reply in (first, second):
            assert reply.status == 200
            assert reply.headers["content-type"] == "application/json; charset=utf-8"
            pairs = json.loads(reply.body, object_pairs_hook=list)
            assert [name for name, _ in pairs] == [
                "access_token", "client_id", "expires_in", "expires_on",
                "ext_expires_in", "not_before", "resource", "token_type",
            ]
            assert all(isinstance(value, str) for _, value in pairs)
            assert dict(pairs) == {
                "access_token": f"eyJ.{DEFAULT}.1",
                "client_id": DEFAULT,
                "expires_in": "3600",
                "expires_on": str(NOW + 3600),
                "ext_expires_in": "7200",
                "not_before": str(NOW),
                "resource": "https://vault.azure.net",
                "token_type": "Bearer",
            }
        assert parts.metrics.token_ok == 2

    app_test(run, scenario)


def test_repeated_identical_requests_are_framed_per_request(run: Any) -> None:
    # Identical bytes share the app's judgement of their target and its last rendered
    # answer: HEAD, HTTP/1.0 and keep-alive must still be framed each time.
    head = TOKEN_GET.replace(b"GET ", b"HEAD ", 1)
    http10 = TOKEN_GET.replace(b"HTTP/1.1", b"HTTP/1.0")
    http10_keep_alive = http10.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")

    async def scenario(parts: AppParts) -> None:
        async with serving(parts.app) as (_, clients):
            conn = await clients.open()
            bodies = []
            for request in (TOKEN_GET, TOKEN_GET, head, TOKEN_GET):
                await conn.send(request)
                reply = await conn.reply(head=request is head)
                assert "connection" not in reply.headers
                bodies.append(reply.body)
                if request is head:
                    # CONTRACT.md: 405 for any method other than GET; framed without a body.
                    assert reply.status == 405
                    assert reply.body == b""
                    assert int(reply.headers["content-length"]) > 0
                else:
                    assert reply.status == 200
            assert bodies[0] == bodies[1] == bodies[3]
            for _ in range(2):
                other = await clients.open()
                await other.send(TOKEN_GET)
                assert (await other.reply()).body == bodies[0]
            legacy = await clients.open()
            await legacy.send(http10_keep_alive)
            reply = await legacy.reply()
            assert (reply.headers["connection"], reply.body) == ("keep-alive", bodies[0])
            await legacy.send(http10)
            reply = await legacy.reply()
            assert (reply.headers["connection"], reply.body) == ("close", bodies[0])
            assert await legacy.eof() == b""
            assert len(parts.fetcher.keys) == 1
        await parts.cache.aclose()

    app_test(run, scenario)


def test_identical_keep_alive_hits_are_answered_alike(run: Any) -> None:
    # The miss and the hits after it: same status, headers and body, each counted, one exchange.
    async def scenario(parts: AppParts) -> None:
        async with serving(parts.app) as (_, clients):
            conn = await clients.open()
            replies = []
            for _ in range(5):
                await conn.send(TOKEN_GET)
                replies.append(await conn.reply())
            for reply in replies:
                reply.headers.pop("date")
                assert (reply.status, reply.headers, reply.body) == (
                    replies[0].status, replies[0].headers, replies[0].body
                )
            assert "connection" not in replies[0].headers
            assert parts.metrics.token_ok == 5
            assert len(parts.fetcher.keys) == 1
        await parts.cache.aclose()

    app_test(run, scenario)


def test_a_connection_per_request_gets_the_same_answer_a_close_a_count_and_a_line_each(
    run: Any, tmp_path: Any
) -> None:
    # Clients that open a connection per token request (curl, old SDKs) send the same
    # bytes each time: they get `Connection: close`, the close itself, the same answer,
    # a count and a line each.
    close_get = TOKEN_GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")

    async def scenario() -> None:
        with open(tmp_path / "stderr", "wb") as sink:
            access_log = AccessLog(
                enabled=True, schedule_flush=asyncio.get_running_loop().call_soon, fd=sink.fileno()
            )
            parts = _make_app(access_log=access_log)
            async with serving(parts.app) as (_, clients):
                replies = []
                for _ in range(5):
                    conn = await clients.open()
                    await conn.send(close_get)
                    replies.append(await conn.reply())
                    assert await conn.eof() == b""
                # A keep-alive client, then the same client asking to close.
                conn = await clients.open()
                for request in (TOKEN_GET, TOKEN_GET, close_get):
                    await conn.send(request)
                    replies.append(await conn.reply())
                assert await conn.eof() == b""
            access_log.flush()
            await parts.cache.aclose()
        for reply in replies:
            reply.headers.pop("date")
        closing = replies[:5] + replies[-1:]
        for reply in closing:
            assert (reply.status, reply.headers, reply.body) == (
                closing[0].status, closing[0].headers, closing[0].body
            )
        assert closing[0].headers["connection"] == "close"
        assert "connection" not in replies[5].headers and replies[5].body == closing[0].body
        assert parts.metrics.token_ok == 8
        assert parts.cache.hits == 7
        assert len(parts.fetcher.keys) == 1
        lines = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]
        assert [line["cache"] for line in lines] == ["miss"] + ["hit"] * 7

    run(scenario())


async def _logged_keep_alive_hits(
    tmp_path: Any, count: int, **options: Any
) -> tuple[AppParts, list[dict[str, Any]]]:
    """`count` identical token GETs on one keep-alive connection; the access lines they made."""
    with open(tmp_path / "stderr", "wb") as sink:
        access_log = AccessLog(enabled=True, schedule_flush=asyncio.get_running_loop().call_soon, fd=sink.fileno())
        parts = _make_app(access_log=access_log, **options)
        async with serving(parts.app) as (_, clients):
            conn = await clients.open()
            for _ in range(count):
                await conn.send(TOKEN_GET)
                assert (await conn.reply()).status == 200
        access_log.flush()
        await parts.cache.aclose()
    return parts, [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]


def test_every_hit_is_logged_and_counted(run: Any, tmp_path: Any) -> None:
    # One access line per request, a hit's as a miss's.
    parts, lines = run(_logged_keep_alive_hits(tmp_path, 6))
    assert [line["cache"] for line in lines] == ["miss"] + ["hit"] * 5
    for line in lines:
        assert line["message"] == "successfully acquired token"
        assert (line["method"], line["status"], line["client_id"]) == ("GET", 200, DEFAULT)
        assert line["uri"] == TOKEN_GET.split(b" ")[1].decode()
        assert 0 <= line["duration_ms"] < 1000
    assert parts.metrics.token_ok == 6
    assert parts.cache.hits == 5


def test_no_negative_duration_is_logged_when_the_wall_clock_steps_back(run: Any, tmp_path: Any) -> None:
    # The wall clock stamps the line; the duration is measured on the monotonic clock.
    readings = itertools.count()

    def stepping_back() -> float:
        return NOW + 0.5 - next(readings) * 0.0003  # 0.3 ms back at every reading

    parts, lines = run(_logged_keep_alive_hits(tmp_path, 6, clock=stepping_back))
    assert [line["cache"] for line in lines] == ["miss"] + ["hit"] * 5
    assert all(line["duration_ms"] >= 0 for line in lines)
    assert parts.cache.hits == 5


def test_one_connection_alternating_requests_gets_each_its_own_answer(run: Any) -> None:
    # Two targets' answers kept side by side never answer each other's request.
    other_get = TOKEN_GET.replace(b"vault.azure.net", b"storage.azure.com")

    async def scenario(parts: AppParts) -> None:
        async with serving(parts.app) as (_, clients):
            conn = await clients.open()
            resources = []
            for request in (TOKEN_GET, other_get) * 4 + (TOKEN_GET, TOKEN_GET, other_get, other_get):
                await conn.send(request)
                reply = await conn.reply()
                assert reply.status == 200
                resources.append(reply.json()["resource"])
            assert resources == ["https://vault.azure.net", "https://storage.azure.com"] * 4 + [
                "https://vault.azure.net", "https://vault.azure.net",
                "https://storage.azure.com", "https://storage.azure.com",
            ]
            assert len(parts.fetcher.keys) == 2
            assert parts.cache.hits == 10
        await parts.cache.aclose()

    app_test(run, scenario)


def test_same_bytes_refused_then_accepted_per_request(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        replies = await _ask(parts, TOKEN_NO_METADATA, TOKEN_GET, TOKEN_NO_METADATA, TOKEN_GET)
        assert [reply.status for reply in replies] == [400, 200, 400, 200]
        assert len(parts.fetcher.keys) == 1

    app_test(run, scenario)


def test_token_path_case_and_trailing_slash(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        [reply] = await _ask(parts, TOKEN_UPPER_PATH)
        assert reply.status == 200
        assert reply.json()["resource"] == "https://vault.azure.net"

    app_test(run, scenario)


def test_metadata_true_is_case_insensitive(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        [reply] = await _ask(parts, TOKEN_METADATA_UPPER)
        assert reply.status == 200

    app_test(run, scenario)


REFUSED = [
    (TOKEN_NO_METADATA, 400, "invalid_request", imds.MSG_NO_METADATA, "no-metadata"),
    (TOKEN_METADATA_FALSE, 400, "invalid_request", imds.MSG_NO_METADATA, "metadata-false"),
    (TOKEN_METADATA_TWICE, 400, "invalid_request", imds.MSG_NO_METADATA, "metadata-twice"),
    (TOKEN_FORWARDED, 400, "invalid_request", imds.MSG_FORWARDED, "x-forwarded-for"),
    (TOKEN_POST, 405, "invalid_request", imds.MSG_METHOD, "post"),
    (TOKEN_NO_RESOURCE, 400, "invalid_request", imds.MSG_NO_RESOURCE, "no-resource"),
    (
        b"GET /metadata/identity/oauth2/token?api-version=1&resource=x&client_id=nope HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n",
        400,
        "invalid_request",
        "client_id 'nope' is not a GUID",
        "client-id-not-guid",
    ),
    (NEAR_MISS, 404, "not_found", "refused by azwi-netproxy", "near-miss"),
    # CONTRACT.md: only origin-form targets are passed through.
    (INSTANCE_ABSOLUTE, 404, "not_found", "refused by azwi-netproxy", "absolute-form-instance"),
    (HTTP09_TOKEN, 400, "invalid_request", "only HTTP/1.0 and HTTP/1.1", "http-0.9-with-headers"),
    (HTTP20_TOKEN, 400, "invalid_request", "only HTTP/1.0 and HTTP/1.1", "http-2.0"),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code", "description"),
    [(r, s, c, d) for r, s, c, d, _ in REFUSED],
    ids=[name for *_, name in REFUSED],
)
def test_refused_without_exchange_or_passthrough(
    run: Any, request_bytes: bytes, status: int, code: str, description: str
) -> None:
    async def scenario(parts: AppParts) -> None:
        [reply] = await _ask(parts, request_bytes)
        assert reply.status == status
        body = reply.json()
        assert set(body) == {"error", "error_description"}
        assert body["error"] == code
        assert description in body["error_description"]
        assert parts.fetcher.keys == []
        assert parts.passthrough is not None and parts.passthrough.calls == []

    app_test(run, scenario)


def test_only_listed_unknown_client_is_identity_not_found(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        unlisted = TOKEN_GET.replace(b"vault.azure.net", b"vault.azure.net&client_id=" + UNLISTED.encode())
        listed = TOKEN_GET.replace(b"vault.azure.net", b"vault.azure.net&client_id=" + LISTED.encode())
        refused, ok = await _ask(parts, unlisted, listed)
        assert refused.status == 400
        assert refused.json() == {"error": "invalid_request", "error_description": "Identity not found"}
        assert ok.status == 200
        assert ok.json()["client_id"] == LISTED
        assert [key.client_id for key in parts.fetcher.keys] == [LISTED]

    app_test(run, scenario, only_listed=True)


def test_passthrough(run: Any) -> None:
    path, query = "/metadata/instance", "api-version=2021-02-01"

    async def scenario(parts: AppParts) -> None:
        [reply] = await _ask(parts, INSTANCE)
        assert reply.status == 200
        assert reply.json() == {"compute": {"location": "westeurope"}}
        assert parts.passthrough is not None
        assert parts.passthrough.calls == [("GET", path, query)]
        assert parts.fetcher.keys == []

    app_test(run, scenario)


@pytest.mark.parametrize("method", [b"OPTIONS", b"GET"])
def test_asterisk_target_is_a_client_error(run: Any, method: bytes) -> None:
    # llhttp accepts `OPTIONS *`; with the real pass-through it must be a 4xx, not a 500
    # with a traceback because httpx refused to build the URL. The pass-through points at
    # a loopback port that is bound but not listening: nothing can leave the host.
    async def scenario() -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            passthrough = Passthrough("127.0.0.1", closed.getsockname()[1], run_as_uid=1501)
            parts = _make_app(real_passthrough=passthrough)
            try:
                [reply] = await _ask(parts, method + b" * HTTP/1.1\r\nHost: x\r\n\r\n")
            finally:
                await passthrough.aclose()
        assert 400 <= reply.status < 500, reply.body

    run(scenario())


def test_passthrough_disabled_is_403(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        [reply] = await _ask(parts, INSTANCE)
        assert reply.status == 403
        assert reply.json()["error"] == "forbidden"

    app_test(run, scenario, passthrough=False)


def test_readyz(run: Any) -> None:
    async def scenario(parts: AppParts) -> None:
        ready, = await _ask(parts, READYZ)
        assert (ready.status, ready.body) == (200, b"ok")
        parts.app.ready = False  # what run.py sets when SIGTERM arrives
        shutting, = await _ask(parts, READYZ)
        assert shutting.status == 503

    app_test(run, scenario)


UPSTREAM_FAILURES = [
    (
        IdentityRejected(
            "AADSTS700016: Application with identifier 'x' was not found", entra_error="unauthorized_client"
        ),
        400,
        {"error": "unauthorized_client", "error_description": "AADSTS700016: Application with identifier 'x' was not found"},
        None,
        "identity-rejected",
    ),
    (
        UpstreamThrottled("The token service is throttling requests (HTTP 429)", retry_after_s=7),
        429,
        {"error": "too_many_requests", "error_description": "The token service is throttling requests (HTTP 429)"},
        "7",
        "throttled",
    ),
    (
        UpstreamUnavailable("Cannot reach the token service (ConnectError)", retry_after_s=5),
        503,
        {"error": "service_unavailable", "error_description": "Cannot reach the token service (ConnectError)"},
        "5",
        "unavailable",
    ),
    (
        RuntimeError("secret internals: connection string=abc"),
        500,
        {"error": "internal_error", "error_description": "Internal error in azwi-netproxy"},
        None,
        "internal-error",
    ),
]


@pytest.mark.parametrize(
    ("error", "status", "body", "retry_after"),
    [(e, s, b, r) for e, s, b, r, _ in UPSTREAM_FAILURES],
    ids=[name for *_, name in UPSTREAM_FAILURES],
)
def test_fetch_failures_become_imds_errors(
    run: Any,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    status: int,
    body: dict[str, str],
    retry_after: str | None,
) -> None:
    async def scenario(parts: AppParts) -> None:
        parts.fetcher.error = error
        [reply] = await _ask(parts, TOKEN_GET)
        assert reply.status == status
        assert reply.json() == body
        assert reply.headers.get("retry-after") == retry_after
        assert b"secret" not in reply.body
        assert len(parts.fetcher.keys) == 1

    with caplog.at_level(logging.ERROR, logger="azwi_netproxy"):
        app_test(run, scenario)
    # The internal one is logged with its traceback for the operator, never sent to the app.
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert bool(logged) is isinstance(error, RuntimeError)
