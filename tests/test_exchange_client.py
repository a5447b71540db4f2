"""The exchange's HTTP client against real sockets: idle connections, dropped ones, proxies.

Name: test_exchange_client
Scope: in-process. A TLS token service on 127.0.0.1 (asyncio streams, trustme certificates)
    whose connections can misbehave as networks do, an HTTP CONNECT proxy on 127.0.0.1, and
    the product's own Exchanger and endpoints (httpx's client and transport under them).
Depends: trustme; nothing leaves loopback.

What is asserted (issue 16, hole 7, and the proxy rules in CONTRACT.md):
- a pooled connection idle longer than the keep-alive expiry is not reused, so one that a
  NAT dropped silently (no reset; Azure's SNAT idles flows out after 4 minutes) cannot make
  an exchange wait out its read timeout; the control shows what reuse would cost; the
  expiry the proxy is configured with is 60 s (reused after 59 s idle, never after 61 s:
  httpcore's clock moved forward, so no test waits a minute);
- a request that fails on a connection before any byte of the answer is sent once more, at
  once, on another connection;
- HTTPS_PROXY / NO_PROXY apply to Entra exchanges, never to identity binding's token proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpcore._async.http11 as httpcore_http11
import pytest
import trustme

from azwi_netproxy.errors import UpstreamUnavailable
from azwi_netproxy.proxy.binding import BindingEndpoint
from azwi_netproxy.proxy.config import IdentityBinding
from azwi_netproxy.proxy.entra import AuthorityEndpoint, ExchangePolicy, Exchanger
from azwi_netproxy.proxy.tokens import CacheKey

pytestmark = pytest.mark.timeout(60)

KEY = CacheKey("https://127.0.0.1", "tenant", "11111111-1111-1111-1111-111111111111", "api://x/.default")


@dataclass
class Connection:
    number: int
    requests: int = 0
    answered: int = 0
    last_answer_at: float = 0.0


@dataclass
class TokenService:
    """A TLS token service whose connections misbehave after an idle spell.

    `after_idle`: what a connection does with a request that comes more than `idle_s` after
    its previous answer: "answer", "silence" (read it, never answer, never close: a NAT
    that forgot the flow) or "close" (read it, close without an answer).
    """

    after_idle: str = "answer"
    idle_s: float = 0.5
    port: int = 0
    connections: list[Connection] = field(default_factory=list)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        conn = Connection(len(self.connections) + 1)
        self.connections.append(conn)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                conn.requests += 1
                idle = conn.answered and time.monotonic() - conn.last_answer_at > self.idle_s
                if idle and self.after_idle == "silence":
                    await asyncio.Event().wait()  # until the test ends
                if idle and self.after_idle == "close":
                    writer.close()
                    return
                body = json.dumps({"access_token": f"tok-{conn.number}-{conn.requests}",
                                   "expires_in": 3600, "token_type": "Bearer"}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                conn.answered += 1
                conn.last_answer_at = time.monotonic()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def serving(ca: trustme.CA, service: TokenService) -> AsyncIterator[TokenService]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "token-proxy.example").configure_cert(context)
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0, ssl=context)
    service.port = server.sockets[0].getsockname()[1]
    try:
        yield service
    finally:
        await service.close()
        server.close()
        await server.wait_closed()


def exchanger_for(endpoint: AuthorityEndpoint | BindingEndpoint, sleeps: list[float],
                  *, timeout_s: float) -> Exchanger:
    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    return Exchanger(endpoint, lambda: "sa-token", policy=ExchangePolicy(timeout_s=timeout_s, deadline_s=60.0),
                     sleep=sleep)


def authority(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory, port: int, *, timeout_s: float,
              keepalive_expiry_s: float | None = None, via_proxy: bool = False) -> AuthorityEndpoint:
    """Entra at the token service, trusting only the test CA (as SSL_CERT_FILE would)."""
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return AuthorityEndpoint(f"https://127.0.0.1:{port}", ca_file=str(ca_file), timeout_s=timeout_s,
                             keepalive_expiry_s=keepalive_expiry_s, via_environment_proxy=via_proxy)


class IdleClock:
    """time.monotonic as httpcore's HTTP/1.1 connections read it (`time.monotonic()` in
    httpcore/_async/http11.py, both where an idle spell starts and where its expiry is
    checked), moved forward at will. Only that module sees it: the event loop, the token
    service and the timeouts keep the real clock. Should httpcore stop reading the clock
    there, no idle connection would ever look expired, and the 61 s case fails."""

    def __init__(self) -> None:
        self.skipped_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped_s


@pytest.mark.parametrize(("idle_s", "reused"), [(59.0, True), (61.0, False)], ids=["59s", "61s"])
async def test_the_exchange_client_reuses_a_connection_idle_59_s_and_never_one_idle_61_s(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        idle_s: float, reused: bool) -> None:
    """SECURITY.md: idle pooled connections are not reused after 60 s (Azure's SNAT forgets an
    idle flow after 4 minutes, without a word). The endpoint as the proxy builds it, with its
    configured expiry, judged by which connection the token service sees the second request on."""
    clock = IdleClock()
    monkeypatch.setattr(httpcore_http11, "time", clock)
    async with serving(ca, TokenService()) as service:
        endpoint = authority(ca, tmp_path_factory, service.port, timeout_s=10.0)
        exchange = exchanger_for(endpoint, [], timeout_s=10.0)
        try:
            assert (await exchange(KEY)).access_token == "tok-1-1"
            clock.skipped_s += idle_s
            second = await exchange(KEY)
        finally:
            await endpoint.aclose()
    if reused:
        assert [c.requests for c in service.connections] == [2], "a connection idle 59 s was not reused"
        assert second.access_token == "tok-1-2"
    else:
        assert [c.requests for c in service.connections] == [1, 1], "a connection idle 61 s was reused"
        assert second.access_token == "tok-2-1"


async def test_a_connection_idle_past_the_expiry_is_not_reused_so_a_silent_drop_costs_nothing(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> None:
    sleeps: list[float] = []
    async with serving(ca, TokenService(after_idle="silence", idle_s=0.5)) as service:
        endpoint = authority(ca, tmp_path_factory, service.port, timeout_s=20.0, keepalive_expiry_s=0.3)
        exchange = exchanger_for(endpoint, sleeps, timeout_s=20.0)
        try:
            assert (await exchange(KEY)).access_token == "tok-1-1"
            await asyncio.sleep(0.8)  # past the expiry and past the service's patience
            begun = time.monotonic()
            token = await exchange(KEY)
            took_s = time.monotonic() - begun
        finally:
            await endpoint.aclose()
    assert token.access_token == "tok-2-1", "answered on a new connection"
    assert [c.requests for c in service.connections] == [1, 1], "the idle connection was never used again"
    assert took_s < 5.0, f"waited {took_s:.1f} s: the read timeout (20 s) must not be what ends it"
    assert sleeps == []


async def test_control_reusing_a_silently_dropped_connection_waits_out_the_read_timeout(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> None:
    """What the expiry prevents: with a longer one, the same idle spell stalls the exchange."""
    sleeps: list[float] = []
    async with serving(ca, TokenService(after_idle="silence", idle_s=0.5)) as service:
        endpoint = authority(ca, tmp_path_factory, service.port, timeout_s=1.5, keepalive_expiry_s=30.0)
        exchange = exchanger_for(endpoint, sleeps, timeout_s=1.5)
        try:
            await exchange(KEY)
            await asyncio.sleep(0.8)
            begun = time.monotonic()
            token = await exchange(KEY)
            took_s = time.monotonic() - begun
        finally:
            await endpoint.aclose()
    assert service.connections[0].requests == 2, "the stale connection was reused"
    assert took_s >= 1.4, took_s
    assert token.access_token == "tok-2-1"  # the spaced retry, after the timeout
    assert len(sleeps) == 1


async def test_a_connection_closed_before_the_answer_is_sent_once_more_at_once_on_a_new_one(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> None:
    sleeps: list[float] = []
    # The server closes a kept-alive connection as the next request arrives on it: the race
    # every keep-alive client meets. Expiry cannot help, so the request is sent again.
    async with serving(ca, TokenService(after_idle="close", idle_s=0.0)) as service:
        endpoint = authority(ca, tmp_path_factory, service.port, timeout_s=10.0, keepalive_expiry_s=30.0)
        exchange = exchanger_for(endpoint, sleeps, timeout_s=10.0)
        try:
            await exchange(KEY)
            await asyncio.sleep(0.05)
            token = await exchange(KEY)
        finally:
            await endpoint.aclose()
    assert [c.requests for c in service.connections] == [2, 1]
    assert token.access_token == "tok-2-1"
    assert sleeps == [], "sent again at once, not after a back-off"


# ---- environment proxies -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect_proxy(tunnels: list[str]) -> AsyncIterator[int]:
    """An HTTP CONNECT proxy on loopback that records each tunnel's target and relays it."""

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            assert method == b"CONNECT", head
            tunnels.append(target.decode())
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"], ids=["tunnelled", "no-proxy"])
async def test_exchanges_with_entra_honour_https_proxy_and_no_proxy(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        no_proxy: str) -> None:
    tunnels: list[str] = []
    async with serving(ca, TokenService()) as service, connect_proxy(tunnels) as proxy_port:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.setenv("NO_PROXY", no_proxy)
        endpoint = authority(ca, tmp_path_factory, service.port, timeout_s=10.0, via_proxy=True)
        try:
            token = await exchanger_for(endpoint, [], timeout_s=10.0)(KEY)
        finally:
            await endpoint.aclose()
    assert token.access_token == "tok-1-1"
    assert tunnels == ([] if no_proxy else [f"127.0.0.1:{service.port}"])


async def test_identity_binding_never_goes_through_an_environment_proxy(
        ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    tunnels: list[str] = []
    async with serving(ca, TokenService()) as service, connect_proxy(tunnels) as proxy_port:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.setenv("NO_PROXY", "")
        binding = IdentityBinding(token_proxy_url=f"https://127.0.0.1:{service.port}",
                                  sni_name="token-proxy.example", ca_data=ca.cert_pem.bytes().decode())
        endpoint = BindingEndpoint(binding, timeout_s=10.0)
        try:
            token = await exchanger_for(endpoint, [], timeout_s=10.0)(KEY)
        finally:
            await endpoint.aclose()
    assert token.access_token == "tok-1-1"
    assert tunnels == []


async def test_a_proxy_that_refuses_the_tunnel_is_a_503_kind_of_failure(
        ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    monkeypatch.setenv("NO_PROXY", "")
    endpoint = authority(ca, tmp_path_factory, 9, timeout_s=2.0, via_proxy=True)
    sleeps: list[float] = []
    try:
        with pytest.raises(UpstreamUnavailable):
            await exchanger_for(endpoint, sleeps, timeout_s=2.0)(KEY)
    finally:
        await endpoint.aclose()
        server.close()
        await server.wait_closed()
    assert len(sleeps) == 3, "retried as any transient failure"

