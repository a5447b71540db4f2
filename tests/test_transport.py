"""LeanTransport and lean_client against real HTTP/1.1 servers on loopback.

Name: test_transport
Scope: one event loop per test, parametrised over asyncio and uvloop (tests/test_server.py's
    style: the uvloop case is skipped with a reason when uvloop cannot be imported). Each
    test starts a scripted asyncio server on 127.0.0.1:0 (trustme certificates for TLS) that
    writes raw response bytes, counts accepted connections, records the raw requests and
    notices when the client closes; the client side is azwi_netproxy.transport behind
    httpx.AsyncClient, as entra.py, tlsreload.py and passthrough.py use it.
Depends: azwi_netproxy.transport, trustme. No mocks.

What it checks is the module docstring's promise: framing (Content-Length, chunked,
close-delimited), keep-alive reuse with at most MAX_IDLE_PER_ORIGIN idle connections, one
transparent resend when a reused connection dies before answering, httpx's timeouts and
exceptions (cause chained), answers of at most 1 MiB, SNI from the `sni_hostname` extension,
raw bytes for a pass-through. Timeout tests use 0.3 s limits; every test runs under a 5 s
budget so a hang fails quickly instead of at pytest-timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import trustme
from support.loops import LOOP_FACTORIES, runner

from azwi_netproxy.transport import (
    MAX_IDLE_PER_ORIGIN,
    MAX_RESPONSE_BYTES,
    FormClient,
    LeanTransport,
    form_client,
    lean_client,
)

T = TypeVar("T")


TEST_BUDGET_S = 5.0
TIMEOUT = httpx.Timeout(2.0)
SHORT_READ_S = 0.3
SHORT_READ = httpx.Timeout(2.0, read=SHORT_READ_S)
SNI_NAME = "identity-binding.test.internal"


@pytest.fixture(params=LOOP_FACTORIES)
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Name: run. Scope: function. Runs a coroutine on a fresh loop from the parametrised
    factory, within TEST_BUDGET_S."""
    yield from runner(request.param, TEST_BUDGET_S)


# ---- raw responses ----------------------------------------------------------------------


def response(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    """A Content-Length framed HTTP/1.1 response; `headers` are raw `Name: value` lines."""
    lines = [b"HTTP/1.1 " + status, *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


OK_HELLO = response(b"hello", b"Content-Type: text/plain")
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
UNTIL_CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n"
CLOSE_HELLO = response(b"hello", b"Connection: close")
HTTP10_HELLO = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"
MALFORMED_STATUS = b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"
NOT_HTTP = b"SSH-2.0-OpenSSH_9.6\r\n\r\n"
TOO_LARGE = response(b"x" * (MAX_RESPONSE_BYTES + 1))
TOO_LARGE_CHUNKED = CHUNKED_HEAD + chunked(*[b"y" * 65536] * 16, b"z")
UPGRADE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"
)
SHORT_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"
# Some servers answer an idle keep-alive connection with a 408 before closing it.
IDLE_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


# ---- a scripted upstream server ---------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """The server's side of one accepted connection."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self) -> bytes | None:
        """One request (head + Content-Length body), or None once the client has closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
            return None
        self.requests.append(head + body)
        return head + body

    async def send(self, data: bytes, *, piece: int = 0, delay_s: float = 0.0) -> None:
        """Write `data`, in separate writes of `piece` bytes with a pause between them if asked."""
        step = piece or len(data) or 1
        for start in range(0, len(data), step):
            self.writer.write(data[start : start + step])
            await self.writer.drain()
            if delay_s:
                await asyncio.sleep(delay_s)

    async def until_peer_closes(self) -> None:
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.peer_closed.set()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


Script = Callable[[Conn], Awaitable[None]]


class Upstream:
    """Runs `script(conn)` for each accepted connection; closes the connection after it."""

    def __init__(self, script: Script, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._script = script
        self._ssl = ssl_context
        self.conns: list[Conn] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepts(self) -> int:
        return len(self.conns)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.conns:
            conn.writer.close()
        await self._server.wait_closed()
        # Let closing transports (TLS shutdown included) finish before the loop goes away.
        for _ in range(3):
            await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._script(conn)
        except ConnectionError:
            pass
        finally:
            self._tasks.discard(task)
            conn.done.set()
            writer.close()


def path_of(request: bytes) -> bytes:
    return request.split(b" ", 2)[1]


def replying(answer: Callable[[Conn, bytes], bytes]) -> Script:
    """Keep-alive server: answers every request on a connection until the client closes."""

    async def script(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            await conn.send(answer(conn, request))

    return script


def echo_path(conn: Conn, request: bytes) -> bytes:
    return response(path_of(request), b"Content-Type: text/plain")


async def settled(event: asyncio.Event, timeout_s: float = 2.0) -> None:
    await asyncio.wait_for(event.wait(), timeout_s)


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Let the loop run until `predicate` holds (bounded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def new_client(transport: LeanTransport, timeout: httpx.Timeout = TIMEOUT) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)


def causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# ---- requests and responses as sent -----------------------------------------------------


def test_get_request_and_response_arrive_as_sent(run: Any) -> None:
    reply = response(
        b'{"compute": {}}',
        b"Content-Type: application/json; charset=utf-8",
        b"X-Multi: a",
        b"X-Multi: b",
        b"X-Odd: value: with colon",
        status=b"203 Non-Authoritative Information",
    )

    async def scenario() -> None:
        async with Upstream(replying(lambda conn, request: reply)) as upstream:
            async with new_client(LeanTransport()) as client:
                got = await client.get(
                    upstream.url("/metadata/instance?api-version=2021-02-01&q=%2F%20x"),
                    headers={"Metadata": "true"},
                )
            sent = got.request
            expected = (
                b"GET /metadata/instance?api-version=2021-02-01&q=%2F%20x HTTP/1.1\r\n"
                + b"".join(name + b": " + value + b"\r\n" for name, value in sent.headers.raw)
                + b"\r\n"
            )
            assert upstream.conns[0].requests == [expected]
            assert (b"Host", b"127.0.0.1:%d" % upstream.port) in sent.headers.raw
            assert (b"Metadata", b"true") in sent.headers.raw
            assert got.status_code == 203
            assert got.http_version == "HTTP/1.1"
            assert got.headers["content-type"] == "application/json; charset=utf-8"
            assert got.headers.get_list("x-multi") == ["a", "b"]
            assert got.headers["x-odd"] == "value: with colon"
            assert got.content == b'{"compute": {}}'

    run(scenario())


def test_post_form_body_arrives_as_sent(run: Any) -> None:
    form = {"grant_type": "client_credentials", "scope": "https://vault.azure.net/.default", "x": "a b&c"}
    error = b'{"error": "invalid_client"}'

    async def scenario() -> None:
        async with Upstream(
            replying(
                lambda conn, request: response(
                    error, b"Content-Type: application/json", status=b"401 Unauthorized"
                )
            )
        ) as upstream:
            async with new_client(LeanTransport()) as client:
                got = await client.post(upstream.url("/tenant/oauth2/v2.0/token"), data=form)
            sent = got.request
            body = b"grant_type=client_credentials&scope=https%3A%2F%2Fvault.azure.net%2F.default&x=a+b%26c"
            expected = (
                b"POST /tenant/oauth2/v2.0/token HTTP/1.1\r\n"
                + b"".join(name + b": " + value + b"\r\n" for name, value in sent.headers.raw)
                + b"\r\n"
                + body
            )
            assert upstream.conns[0].requests == [expected]
            headers = {name.lower(): value for name, value in sent.headers.raw}
            assert headers[b"host"] == b"127.0.0.1:%d" % upstream.port
            assert headers[b"content-length"] == b"%d" % len(body)
            assert headers[b"content-type"] == b"application/x-www-form-urlencoded"
            assert (got.status_code, got.content) == (401, error)
            assert got.headers["content-type"] == "application/json"

    run(scenario())


# ---- response framings ------------------------------------------------------------------

BIG_BODY = bytes(range(256)) * 400  # 100 KiB: several reads of the transport's 64 KiB chunk


@dataclass(frozen=True)
class Framing:
    reply: bytes
    status: int
    body: bytes
    piece: int = 0
    delay_s: float = 0.0
    close_after: bool = False


FRAMINGS = [
    pytest.param(Framing(response(BIG_BODY), 200, BIG_BODY), id="content-length"),
    pytest.param(
        # 7-byte writes split chunk-size lines, chunk data and the CRLFs between them.
        Framing(
            CHUNKED_HEAD + chunked(b"hello", b" ", b"world", b"!" * 40),
            200,
            b"hello world" + b"!" * 40,
            piece=7,
            delay_s=0.002,
        ),
        id="chunked-split",
    ),
    pytest.param(
        Framing(UNTIL_CLOSE_HEAD + BIG_BODY, 200, BIG_BODY, piece=16384, delay_s=0.002, close_after=True),
        id="close-delimited",
    ),
    pytest.param(Framing(NO_CONTENT, 204, b""), id="no-content-204"),
    pytest.param(Framing(OK_HELLO, 200, b"hello", piece=1, delay_s=0.001), id="byte-by-byte"),
]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_response_framings(run: Any, framing: Framing) -> None:
    async def script(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(framing.reply, piece=framing.piece, delay_s=framing.delay_s)
        if not framing.close_after:
            await conn.until_peer_closes()

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            async with new_client(LeanTransport()) as client:
                got = await client.get(upstream.url("/framing"))
            assert got.status_code == framing.status
            assert got.content == framing.body

    run(scenario())


def test_close_delimited_connection_is_not_kept(run: Any) -> None:
    async def script(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.send(UNTIL_CLOSE_HEAD + b"the end")

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                first = await client.get(upstream.url())
                assert transport.idle_connections() == 0
                second = await client.get(upstream.url())
            assert first.content == second.content == b"the end"
            assert upstream.accepts == 2

    run(scenario())


# ---- keep-alive -------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(run: Any) -> None:
    async def scenario() -> None:
        async with Upstream(replying(echo_path)) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                bodies = [(await client.get(upstream.url(f"/{n}"))).content for n in range(3)]
                assert transport.idle_connections() == 1
            assert bodies == [b"/0", b"/1", b"/2"]
            assert upstream.accepts == 1
            assert [path_of(r) for r in upstream.conns[0].requests] == [b"/0", b"/1", b"/2"]
            # aclose() of the client closes the idle connection.
            await settled(upstream.conns[0].peer_closed)

    run(scenario())


@pytest.mark.parametrize("reply", [CLOSE_HELLO, HTTP10_HELLO], ids=["connection-close", "http10"])
def test_server_refusing_keep_alive_gets_a_new_connection_per_request(run: Any, reply: bytes) -> None:
    async def scenario() -> None:
        # The server keeps its end open: the client must be the one closing.
        async with Upstream(replying(lambda conn, request: reply)) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                first = await client.get(upstream.url())
                await settled(upstream.conns[0].peer_closed)
                assert transport.idle_connections() == 0
                second = await client.get(upstream.url())
            assert first.content == second.content == b"hello"
            assert upstream.accepts == 2

    run(scenario())


def test_at_most_four_idle_connections_per_origin(run: Any) -> None:
    concurrent = MAX_IDLE_PER_ORIGIN + 2
    arrived: list[Conn] = []
    all_arrived = asyncio.Event()

    async def script(conn: Conn) -> None:
        # The first `concurrent` requests are held until all have arrived, so each has its
        # own connection; afterwards answer at once.
        while (request := await conn.read_request()) is not None:
            if len(arrived) < concurrent:
                arrived.append(conn)
                if len(arrived) == concurrent:
                    all_arrived.set()
                await all_arrived.wait()
            await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                got = await asyncio.gather(*(client.get(upstream.url(f"/{n}")) for n in range(concurrent)))
                assert [r.content for r in got] == [b"/%d" % n for n in range(concurrent)]
                assert upstream.accepts == concurrent
                assert transport.idle_connections() == MAX_IDLE_PER_ORIGIN
                await until(lambda: sum(c.peer_closed.is_set() for c in upstream.conns) == 2)
                # The four kept ones serve the next burst without new connections.
                again = await asyncio.gather(
                    *(client.get(upstream.url(f"/again{n}")) for n in range(MAX_IDLE_PER_ORIGIN))
                )
                assert all(r.status_code == 200 for r in again)
                assert upstream.accepts == concurrent
                assert transport.idle_connections() == MAX_IDLE_PER_ORIGIN

    run(scenario())


# ---- stale kept-alive connections -------------------------------------------------------


def test_server_closing_after_answer_next_request_uses_a_new_connection(run: Any) -> None:
    async def script(conn: Conn) -> None:
        # Answers without Connection: close, then closes anyway (an idle timeout of zero).
        request = await conn.read_request()
        if request is not None:
            await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            async with new_client(LeanTransport()) as client:
                first = await client.get(upstream.url("/one"))
                await settled(upstream.conns[0].done)
                second = await client.get(upstream.url("/two"))
            assert (first.content, second.content) == (b"/one", b"/two")
            assert upstream.accepts == 2

    run(scenario())


def answer_once_then_close(how: str) -> Callable[[Conn], Coroutine[Any, Any, None]]:
    """Each connection answers one request; the next one on it finds the server closing it
    at that very moment (the idle-timeout race), without an answer: FIN or RST."""

    async def script(conn: Conn) -> None:
        request = await conn.read_request()
        if request is None:
            return
        await conn.send(echo_path(conn, request))
        if await conn.read_request() is not None and how == "rst":
            conn.reset()

    return script


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_reused_connection_closed_before_answering_resends_a_get_once(run: Any, how: str) -> None:
    script = answer_once_then_close(how)

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                first = await client.get(upstream.url("/one"))
                second = await client.get(upstream.url("/two"))
            assert (first.content, second.content) == (b"/one", b"/two")
            assert upstream.accepts == 2
            # The same request went out twice: on the stale connection and on the new one.
            assert upstream.conns[0].requests[1] == upstream.conns[1].requests[0]
            assert upstream.conns[1].requests[0].startswith(b"GET /two ")

    run(scenario())


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_post_is_never_sent_twice_by_the_transport(run: Any, how: str) -> None:
    # The server may have read the POST before the connection died: repeating it is the
    # caller's decision (entra.Exchanger counts and spaces its attempts), not ours.
    script = answer_once_then_close(how)

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                first = await client.post(upstream.url("/one"), data={"a": "1"})
                assert first.content == b"/one"
                with pytest.raises(httpx.TransportError):
                    await client.post(upstream.url("/two"), data={"a": "2"})
            assert upstream.accepts == 1
            assert sum(len(c.requests) for c in upstream.conns) == 2

    run(scenario())


def test_reset_on_the_new_connection_too_is_an_error_not_a_hang(run: Any) -> None:
    async def script(conn: Conn) -> None:
        if conn.index == 0:
            request = await conn.read_request()
            if request is None:
                return
            await conn.send(echo_path(conn, request))
        if await conn.read_request() is not None:
            conn.reset()

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                assert (await client.get(upstream.url("/one"))).content == b"/one"
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    await client.get(upstream.url("/two"))
                assert transport.idle_connections() == 0
            assert upstream.accepts == 2

    run(scenario())


def test_two_stale_idle_connections_still_resend_on_a_new_one(run: Any) -> None:
    # The docstring: a request that fails on a reused connection before any answer is sent
    # once more "on a new one". With two stale connections idle (a server restart), the
    # retry must not take the second stale one from the pool.
    both_arrived = asyncio.Event()
    first_requests: list[Conn] = []

    async def script(conn: Conn) -> None:
        request = await conn.read_request()
        if request is None:
            return
        if len(first_requests) < 2:
            first_requests.append(conn)
            if len(first_requests) == 2:
                both_arrived.set()
            await both_arrived.wait()
            await conn.send(echo_path(conn, request))
            await conn.read_request()  # the next request on it: close without answering
            return
        await conn.send(echo_path(conn, request))
        await conn.until_peer_closes()

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                await asyncio.gather(client.get(upstream.url("/a")), client.get(upstream.url("/b")))
                assert transport.idle_connections() == 2
                got = await client.get(upstream.url("/c"))
            assert got.content == b"/c"
            assert upstream.accepts == 3

    run(scenario())


def test_unsolicited_408_on_an_idle_connection_is_not_taken_as_the_answer(run: Any) -> None:
    # A server closing an idle keep-alive connection may first write a 408 (and a FIN).
    # The bytes wait in the idle connection's buffer; reusing it hands the next request
    # an answer that was never meant for it. httpcore drops idle connections that became
    # readable for this reason.
    async def script(conn: Conn) -> None:
        request = await conn.read_request()
        if request is None:
            return
        await conn.send(echo_path(conn, request))
        if conn.index == 0:
            await asyncio.sleep(0.02)
            await conn.send(IDLE_408)
            return
        while (request := await conn.read_request()) is not None:
            await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            async with new_client(LeanTransport()) as client:
                assert (await client.get(upstream.url("/one"))).content == b"/one"
                await settled(upstream.conns[0].done)
                await asyncio.sleep(0.05)  # the client's loop reads the 408 and the FIN
                got = await client.get(upstream.url("/two"))
            assert (got.status_code, got.content) == (200, b"/two")

    run(scenario())


def test_head_response_has_no_body_despite_content_length(run: Any) -> None:
    # Pass-through forwards any method, HEAD included; RFC 9112 section 6.3: a response to
    # HEAD ends after its header section whatever Content-Length says.
    async def script(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.startswith(b"HEAD "):
                await conn.send(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n"
                )
            else:
                await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            async with new_client(LeanTransport(), SHORT_READ) as client:
                head = await client.head(upstream.url("/metadata/instance"))
                assert (head.status_code, head.content) == (200, b"")
                assert head.headers["content-length"] == "42"
                got = await client.get(upstream.url("/after-head"))
                assert got.content == b"/after-head"
            assert upstream.accepts == 1

    run(scenario())


# ---- timeouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent", [b"", b"HTTP/1.1 200 OK\r\nContent-", SHORT_BODY], ids=["no-answer", "half-head", "slow-body"]
)
def test_stalled_answer_is_a_read_timeout(run: Any, sent: bytes) -> None:
    async def script(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.send(sent)
            await conn.until_peer_closes()

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport, SHORT_READ) as client:
                started = time.monotonic()
                with pytest.raises(httpx.ReadTimeout) as caught:
                    await client.get(upstream.url())
                elapsed = time.monotonic() - started
                assert SHORT_READ_S * 0.9 <= elapsed < SHORT_READ_S + 1.0
                assert isinstance(caught.value.__cause__, TimeoutError)
                assert transport.idle_connections() == 0
                await settled(upstream.conns[0].peer_closed)

    run(scenario())


def test_tls_handshake_never_answered_is_a_connect_timeout(run: Any) -> None:
    # A TCP connect on loopback cannot be made to hang reliably; a peer that accepts and
    # never speaks TLS stalls the handshake, which the connect timeout also covers.
    async def scenario() -> None:
        async with Upstream(Conn.until_peer_closes) as upstream:
            timeout = httpx.Timeout(2.0, connect=SHORT_READ_S)
            async with lean_client(ssl_context=None, timeout=timeout) as client:
                started = time.monotonic()
                with pytest.raises(httpx.ConnectTimeout):
                    await client.get(upstream.url(scheme="https"))
                assert time.monotonic() - started < SHORT_READ_S + 1.0

    run(scenario())


# ---- errors -----------------------------------------------------------------------------


def test_connection_refused_is_a_connect_error(run: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: nothing listens there

    async def scenario() -> None:
        async with new_client(LeanTransport()) as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get(f"http://127.0.0.1:{port}/")
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)

    run(scenario())


@pytest.mark.parametrize(
    ("bad", "server_closes"),
    [
        pytest.param(MALFORMED_STATUS, False, id="malformed-status"),
        pytest.param(NOT_HTTP, False, id="not-http"),
        pytest.param(TOO_LARGE, False, id="body-over-1mib"),
        pytest.param(TOO_LARGE_CHUNKED, False, id="chunked-over-1mib"),
        pytest.param(SHORT_BODY, True, id="closed-mid-body"),
        pytest.param(UPGRADE, False, id="upgrade"),
    ],
)
def test_protocol_errors_and_the_connection_is_not_reused(run: Any, bad: bytes, server_closes: bool) -> None:
    async def script(conn: Conn) -> None:
        # The first connection answers well once (so it is kept), then answers badly.
        if conn.index == 0:
            request = await conn.read_request()
            if request is None:
                return
            await conn.send(echo_path(conn, request))
            if await conn.read_request() is None:
                return
            with contextlib.suppress(ConnectionError):
                await conn.send(bad)
            if not server_closes:
                await conn.until_peer_closes()
            return
        while (request := await conn.read_request()) is not None:
            await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                assert (await client.get(upstream.url("/good"))).content == b"/good"
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.get(upstream.url("/bad"))
                assert transport.idle_connections() == 0
                if not server_closes:
                    await settled(upstream.conns[0].peer_closed)
                assert (await client.get(upstream.url("/after"))).content == b"/after"
            assert upstream.accepts == 2
            assert [path_of(r) for r in upstream.conns[1].requests] == [b"/after"]

    run(scenario())


def test_body_of_exactly_1mib_is_accepted(run: Any) -> None:
    body = b"q" * MAX_RESPONSE_BYTES

    async def scenario() -> None:
        async with Upstream(replying(lambda conn, request: response(body))) as upstream:
            async with new_client(LeanTransport()) as client:
                got = await client.get(upstream.url())
            assert got.content == body

    run(scenario())


# ---- TLS and SNI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """Name: ca. Scope: module. A CA whose server certificate names SNI_NAME only (no IP)."""
    return trustme.CA()


def server_context(ca: trustme.CA, seen_sni: list[str | None]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(SNI_NAME).configure_cert(context)

    def record(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    context.sni_callback = record
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def test_tls_with_sni_extension_verifies_the_name_and_reuses(run: Any, ca: trustme.CA) -> None:
    seen_sni: list[str | None] = []

    async def scenario() -> None:
        async with Upstream(replying(echo_path), ssl_context=server_context(ca, seen_sni)) as upstream:
            async with lean_client(ssl_context=client_context(ca), timeout=TIMEOUT) as client:
                for path in ("/one", "/two"):
                    got = await client.get(
                        upstream.url(path, scheme="https"), extensions={"sni_hostname": SNI_NAME}
                    )
                    assert (got.status_code, got.content) == (200, path.encode())
            assert seen_sni == [SNI_NAME]
            assert upstream.accepts == 1

    run(scenario())


def test_tls_without_sni_extension_fails_verification(run: Any, ca: trustme.CA) -> None:
    async def scenario() -> None:
        async with Upstream(replying(echo_path), ssl_context=server_context(ca, [])) as upstream:
            async with lean_client(ssl_context=client_context(ca), timeout=TIMEOUT) as client:
                with pytest.raises(httpx.ConnectError) as caught:
                    await client.get(upstream.url(scheme="https"))
            assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(caught.value))

    run(scenario())


def test_tls_with_an_untrusted_ca_fails(run: Any, ca: trustme.CA) -> None:
    async def scenario() -> None:
        async with Upstream(replying(echo_path), ssl_context=server_context(ca, [])) as upstream:
            other = client_context(trustme.CA())
            async with lean_client(ssl_context=other, timeout=TIMEOUT) as client:
                with pytest.raises(httpx.ConnectError) as caught:
                    await client.get(upstream.url(scheme="https"), extensions={"sni_hostname": SNI_NAME})
            assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(caught.value))

    run(scenario())


# ---- pass-through style -----------------------------------------------------------------


def test_streamed_raw_bytes_stay_encoded_while_content_is_decoded(run: Any) -> None:
    plain = b'{"compute": {"location": "westeurope"}}' * 20
    encoded = gzip.compress(plain)
    reply = response(encoded, b"Content-Type: application/json", b"Content-Encoding: gzip")

    async def scenario() -> None:
        async with Upstream(replying(lambda conn, request: reply)) as upstream:
            async with lean_client(ssl_context=None, timeout=TIMEOUT) as client:
                streamed = await client.send(client.build_request("GET", upstream.url()), stream=True)
                try:
                    raw = b"".join([chunk async for chunk in streamed.aiter_raw()])
                finally:
                    await streamed.aclose()
                decoded = await client.get(upstream.url())
            assert raw == encoded
            assert streamed.headers["content-encoding"] == "gzip"
            assert decoded.content == plain
            assert upstream.accepts == 1

    run(scenario())


# ---- close and cancellation -------------------------------------------------------------


def test_aclose_closes_idle_connections_and_stops_pooling(run: Any) -> None:
    async def scenario() -> None:
        async with Upstream(replying(echo_path)) as upstream:
            transport = LeanTransport()
            client = new_client(transport)
            assert (await client.get(upstream.url("/one"))).content == b"/one"
            assert transport.idle_connections() == 1
            await client.aclose()  # closes the transport
            assert transport.idle_connections() == 0
            await settled(upstream.conns[0].peer_closed)
            # The transport itself still answers, on a connection it no longer keeps.
            request = httpx.Request("GET", upstream.url("/late"), extensions={"timeout": TIMEOUT.as_dict()})
            late = await transport.handle_async_request(request)
            assert (late.status_code, await late.aread()) == (200, b"/late")
            assert transport.idle_connections() == 0
            await settled(upstream.conns[1].peer_closed)
            assert upstream.accepts == 2

    run(scenario())


def test_cancelled_request_closes_its_connection(run: Any) -> None:
    partial_sent = asyncio.Event()

    async def script(conn: Conn) -> None:
        if conn.index == 0:
            if await conn.read_request() is not None:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
                partial_sent.set()
                await conn.until_peer_closes()
            return
        while (request := await conn.read_request()) is not None:
            await conn.send(echo_path(conn, request))

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            transport = LeanTransport()
            async with new_client(transport) as client:
                task = asyncio.create_task(client.get(upstream.url("/cancelled")))
                await settled(partial_sent)
                await asyncio.sleep(0.02)  # the client has read the partial answer
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert transport.idle_connections() == 0
                await settled(upstream.conns[0].peer_closed)
                assert (await client.get(upstream.url("/next"))).content == b"/next"
            assert upstream.accepts == 2

    run(scenario())


# ---- FormClient: the token exchange's POST ----------------------------------------------

EXCHANGE_FORM = {
    "grant_type": "client_credentials",
    "client_id": "11111111-1111-1111-1111-111111111111",
    "scope": "https://vault.azure.net/.default",
    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    "client_assertion": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln+/=",
}
TOKEN_JSON = b'{"access_token":"abc","expires_in":3599,"token_type":"Bearer"}'


def ip_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def test_form_client_sends_what_async_client_post_sends(run: Any, ca: trustme.CA) -> None:
    """The same bytes on the wire as httpx.AsyncClient.post, which it stands in for."""
    headers = {"User-Agent": "azwi-netproxy/test"}
    gzipped = response(
        gzip.compress(TOKEN_JSON), b"Content-Type: application/json", b"Content-Encoding: gzip"
    )

    async def scenario() -> None:
        async with Upstream(
            replying(lambda conn, request: gzipped), ssl_context=ip_server_context(ca)
        ) as upstream:
            url = upstream.url("/tenant/oauth2/v2.0/token", scheme="https")
            async with lean_client(
                ssl_context=client_context(ca), timeout=TIMEOUT, headers=headers
            ) as reference:
                await reference.post(url, data=EXCHANGE_FORM)
            client = form_client(
                ssl_context=client_context(ca), trust_env=True, timeout=TIMEOUT, headers=headers
            )
            try:
                assert not client.via_environment_proxy  # NO_PROXY=* and no proxy set (conftest)
                answers = [
                    await client.post_form(url, EXCHANGE_FORM, timeout_s=2.0, extensions={}) for _ in range(2)
                ]
            finally:
                await client.aclose()
            expected = upstream.conns[0].requests[0]
            assert expected.startswith(b"POST /tenant/oauth2/v2.0/token HTTP/1.1\r\n")
            assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in expected
            assert b"\r\nContent-Type: application/x-www-form-urlencoded\r\n" in expected
            assert expected.endswith(
                b"\r\n\r\ngrant_type=client_credentials&client_id=11111111-1111-1111-1111-111111111111"
                b"&scope=https%3A%2F%2Fvault.azure.net%2F.default"
                b"&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
                b"&client_assertion=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln%2B%2F%3D"
            )
            # Both exchanges on the form client's one kept-alive connection, byte for byte.
            assert upstream.accepts == 2
            assert upstream.conns[1].requests == [expected, expected]
            for answer in answers:
                assert answer.status_code == 200
                assert answer.json() == {"access_token": "abc", "expires_in": 3599, "token_type": "Bearer"}

    run(scenario())


def test_form_client_timeout_is_the_calls_own(run: Any) -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.until_peer_closes()  # never answers

    async def scenario() -> None:
        async with Upstream(script) as upstream:
            client = form_client(ssl_context=None, trust_env=False, timeout=TIMEOUT, headers={})
            try:
                started = time.monotonic()
                with pytest.raises(httpx.ReadTimeout):
                    await client.post_form(
                        upstream.url(), EXCHANGE_FORM, timeout_s=SHORT_READ_S, extensions={}
                    )
                assert SHORT_READ_S <= time.monotonic() - started < TIMEOUT.read  # type: ignore[operator]
            finally:
                await client.aclose()

    run(scenario())


def connect_proxy(tunnels: list[bytes]) -> Script:
    """An HTTP CONNECT proxy, as an Upstream script: records each tunnel's target, then relays."""

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def script(conn: Conn) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            head = await conn.reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            assert method == b"CONNECT", head
            tunnels.append(target)
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            conn.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(relay(conn.reader, up_writer), relay(up_reader, conn.writer))

    return script


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"], ids=["proxied", "no-proxy"])
def test_form_client_honours_https_proxy_and_no_proxy(
    run: Any, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    async def scenario() -> None:
        tunnels: list[bytes] = []
        async with (
            Upstream(connect_proxy(tunnels)) as proxy,
            Upstream(
                replying(lambda conn, request: response(TOKEN_JSON)), ssl_context=ip_server_context(ca)
            ) as upstream,
        ):
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
            monkeypatch.setenv("NO_PROXY", no_proxy)
            client = form_client(ssl_context=client_context(ca), trust_env=True, timeout=TIMEOUT, headers={})
            try:
                assert client.via_environment_proxy
                url = upstream.url("/tenant/oauth2/v2.0/token", scheme="https")
                answer = await client.post_form(url, EXCHANGE_FORM, timeout_s=2.0, extensions={})
            finally:
                await client.aclose()
            assert answer.json()["access_token"] == "abc"
            assert upstream.conns[0].requests[0].startswith(b"POST /tenant/oauth2/v2.0/token HTTP/1.1\r\n")
            expected = [] if no_proxy else [b"127.0.0.1:%d" % upstream.port]
            assert tunnels == expected

    run(scenario())


def test_form_client_ignores_all_proxy_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the Go proxy's client does: ALL_PROXY is not one of the variables it reads.
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY")
    assert not FormClient(transport=LeanTransport(), timeout=TIMEOUT, headers={}, trust_env=True).via_environment_proxy


def test_form_client_without_trust_env_ignores_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY")
    assert not FormClient(transport=LeanTransport(), timeout=TIMEOUT, headers={}).via_environment_proxy
    assert FormClient(
        transport=LeanTransport(), timeout=TIMEOUT, headers={}, trust_env=True
    ).via_environment_proxy
