"""Assemble and run the proxy: event loop, listeners, signals, start-up checks, shutdown.

The I/O wiring lives here so that cli.py stays argument handling and app.py stays
request handling.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final

import uvloop

from azwi_netproxy import __version__
from azwi_netproxy.errors import (
    ConfigError,
    NetproxyError,
    NotFound,
    PassthroughLoop,
    UpstreamError,
    UpstreamUnavailable,
)
from azwi_netproxy.logs import AccessLog, LineWriter
from azwi_netproxy.proxy.app import TokenApp, error_response
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.config import NodeConfig, ProxyConfig
from azwi_netproxy.proxy.entra import (
    AuthorityEndpoint,
    Endpoint,
    ExchangePolicy,
    Exchanger,
    read_assertion_file,
)
from azwi_netproxy.proxy.metrics import Metrics
from azwi_netproxy.proxy.passthrough import Passthrough
from azwi_netproxy.proxy.router import Router
from azwi_netproxy.proxy.server import HttpServer
from azwi_netproxy.proxy.wire import Request, Response

log = logging.getLogger(__name__)

LISTEN_HOST: Final = "127.0.0.1"  # never another address: other pods must not reach us
# Access lines are written in batches at most this late (see logs.AccessLog).
ACCESS_LOG_FLUSH_S: Final = 0.05
# warm_up runs this long after the listener is up, so that the first /readyz is answered
# before it: it imports what exchanges need, about 25 ms of CPU.
WARM_UP_DELAY_S: Final = 0.05
# What warm_up imports, itself or under httpx (httpx's and httpcore's own requirements),
# and prometheus_client, which serve imports before it listens when --metrics-port asks for
# it. check_modules finds them before anything listens, so that a missing one is a start-up
# error (one line, exit 2), never an error answer; httpcore looks for anyio only at its
# first request, so nothing else would find it missing at start.
EXCHANGE_MODULES: Final = ("httpx", "httpcore", "h11", "anyio", "certifi", "idna")
METRICS_MODULES: Final = ("prometheus_client",)


class MetricsApp:
    """GET /metrics on the metrics port; nothing else."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def dispatch(self, request: Request) -> Response:
        if request.target.split(b"?")[0] != b"/metrics":
            return error_response(NotFound("Only /metrics is served on the metrics port"))
        body, content_type = self._metrics.render()
        return Response(200, body, content_type)

    def refuse(self, error: NetproxyError) -> Response:
        return error_response(error)


def deferred_modules(cfg: ProxyConfig | NodeConfig) -> tuple[str, ...]:
    """The modules `cfg` needs that the proxy imports only after its listener is up."""
    return EXCHANGE_MODULES + (METRICS_MODULES if cfg.metrics_port is not None else ())


def check_modules(names: Iterable[str]) -> None:
    """Find each module without importing it (its spec, from the import path).

    Raises:
        ConfigError: one cannot be found: the installation is incomplete.
    """
    import importlib.util

    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(
                f"cannot find the module {name!r} that the proxy needs: "
                "the installation of azwi-netproxy is incomplete"
            )


def warm_exchanges(endpoint: Endpoint) -> None:
    """Import httpx and build the exchange client now that /readyz answers, so that the first
    exchange pays for neither (loading a trust store file of a system's size takes about
    40 ms), and a trust store OpenSSL cannot load is reported at start, once."""
    try:
        endpoint.client()
    except UpstreamUnavailable as exc:  # identity binding's CA not there yet: tried at each exchange
        log.warning("token exchanges cannot start yet", extra={"error": str(exc)})
    except Exception as exc:  # raised again by every exchange, which answers 500
        log.error("cannot prepare token exchanges: every exchange will fail", extra={"error": str(exc)})


async def warm_up(endpoint: Endpoint, fail: Callable[[], None], *, delay_s: float = 0.0) -> bool:
    """Import what exchanges need, once, `delay_s` from now, then warm_exchanges.

    A module that cannot be imported stops the proxy (`fail`) and False is returned: a
    start-up error, not an error answer to every exchange later.
    """
    if delay_s:
        await asyncio.sleep(delay_s)
    try:
        import anyio
        import httpx  # noqa: F401 - importing it is the point

        # httpcore loads its async backend (anyio's: about 20 ms of imports) at its first
        # connection, and so would the first exchange or pass-through's start-up check; the
        # first call into anyio loads it here, before this step yields.
        await anyio.sleep(0)
    except Exception as exc:  # ImportError, or whatever a broken module raises at import
        log.error(
            "cannot import a module the proxy needs: stopping",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
        fail()
        return False
    warm_exchanges(endpoint)
    return True


class Lifetime:
    """Until SIGTERM or SIGINT, or a start-up failure (`fail`: exit 1), and the background
    tasks that run meanwhile (held here: the loop holds tasks weakly)."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.exit_code = 0

    def fail(self) -> None:
        self.exit_code = 1
        self._stop.set()

    def in_background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        await self._stop.wait()

    def cancel_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def close_outbound(endpoint: Endpoint, passthrough: Passthrough | None, access_log: AccessLog) -> None:
    """The end of a shutdown, once nothing listens: the clients to Entra and IMDS, then the
    access lines still held."""
    await endpoint.aclose()
    if passthrough is not None:
        await passthrough.aclose()
    access_log.drain()
    log.info("stopped")


def make_endpoint(cfg: ProxyConfig | NodeConfig) -> Endpoint:
    if cfg.identity_binding is not None:
        from azwi_netproxy.proxy.binding import BindingEndpoint

        return BindingEndpoint(cfg.identity_binding, timeout_s=cfg.exchange_timeout_s)
    return AuthorityEndpoint(
        cfg.authority_host,
        timeout_s=cfg.exchange_timeout_s,
        ca_file=cfg.ssl_cert_file,
        ca_dir=cfg.ssl_cert_dir,
        via_environment_proxy=cfg.via_environment_proxy,
    )


def make_passthrough(cfg: ProxyConfig | NodeConfig) -> Passthrough | None:
    if cfg.passthrough != "all":
        return None
    return Passthrough(cfg.metadata_ip, cfg.metadata_port, run_as_uid=os.getuid())


def make_access_log(writer: LineWriter | None) -> AccessLog:
    """The access log, its lines written in batches (see logs.AccessLog) on the running loop."""
    loop = asyncio.get_running_loop()
    return AccessLog(
        enabled=logging.getLogger("azwi_netproxy").isEnabledFor(logging.INFO),
        schedule_flush=lambda flush: loop.call_later(ACCESS_LOG_FLUSH_S, flush),
        writer=writer,
    )


async def check_passthrough_loop(passthrough: Passthrough) -> None:
    """Start-up check: does our own request to IMDS come back to us?"""
    request = Request(
        method="GET",
        target=b"/metadata/versions",
        http_version="1.1",
        headers=[(b"metadata", b"true")],
    )
    try:
        await asyncio.wait_for(passthrough.forward(request, "/metadata/versions", ""), 5.0)
    except PassthroughLoop as exc:
        log.error("pass-through loop detected at start-up", extra={"error": str(exc)})
    except (UpstreamError, TimeoutError) as exc:
        log.info("instance metadata service not reachable at start-up", extra={"error": str(exc)})


async def serve(cfg: ProxyConfig, started: float, writer: LineWriter | None = None) -> int:
    # The modules imported so far live as long as the process (cli.proxy_main turned
    # collection off while they were imported: 3 % of the instructions to the first /readyz):
    # kept out of every later collection, and collection back on for the rest, whose garbage
    # (prometheus-client's import makes 0.2 MB) must not be frozen. What the imports left as
    # garbage stays, about 0.06 MB: collecting it first would cost 15 ms of CPU.
    gc.freeze()
    gc.enable()
    metrics = Metrics()
    endpoint = make_endpoint(cfg)
    exchanger = Exchanger(
        endpoint,
        read_assertion_file(cfg.federated_token_file),
        policy=ExchangePolicy(timeout_s=cfg.exchange_timeout_s, deadline_s=cfg.exchange_deadline_s),
        on_result=metrics.count_exchange,
    )
    cache = TokenCache(exchanger, max_entries=cfg.cache_max_entries, on_event=metrics.count_cache)
    metrics.earliest_expiry = cache.earliest_expiry
    metrics.cached_tokens = lambda: len(cache)
    metrics.cache_hits = lambda: cache.hits
    passthrough = make_passthrough(cfg)
    router = Router(
        default_client_id=cfg.default_client_id,
        tenant_id=cfg.tenant_id,
        identity_map=cfg.identity_map,
    )
    access_log = make_access_log(writer)
    metrics.log_lines_dropped = lambda: access_log.dropped_lines
    app = TokenApp(
        router=router,
        cache=cache,
        endpoint_id=exchanger.endpoint_id,
        passthrough=passthrough,
        metrics=metrics,
        access_log=access_log,
    )
    server = HttpServer(app)
    metrics_server: HttpServer | None = None
    try:
        # Metrics first: once the proxy port answers /readyz, everything is in place.
        if cfg.metrics_port is not None:
            # prometheus-client is imported now, not at the first scrape or with warm_up's
            # imports: a failure is a start-up error, and its 30 ms of CPU are not spent while the
            # first token request may be waiting. Only this configuration pays them.
            try:
                metrics.prepare()
            except Exception as exc:  # ImportError, or whatever a broken module raises
                log.error(
                    "cannot import a module the proxy needs: stopping",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                await endpoint.aclose()
                return 1
            metrics_server = HttpServer(MetricsApp(metrics))
            # Prometheus scrapes from outside the pod; metrics carry no tokens or client secrets.
            await metrics_server.start("0.0.0.0", cfg.metrics_port)
        port = await server.start(LISTEN_HOST, cfg.proxy_port)
    except OSError as exc:
        log.error(
            "cannot listen",
            extra={"port": cfg.proxy_port, "metrics_port": cfg.metrics_port, "error": str(exc)},
        )
        if metrics_server is not None:
            await metrics_server.shutdown()
        await endpoint.aclose()
        return 1
    log.info(
        "starting the proxy server",
        extra={
            "version": __version__,
            "port": port,
            "metrics_port": cfg.metrics_port,
            "startup_ms": round((time.monotonic() - started) * 1000, 1),
            "default_client_id": cfg.default_client_id,
            "mapped_identities": len(cfg.identity_map.identities),
            "only_listed": cfg.identity_map.only_listed,
            "identity_binding": cfg.identity_binding is not None,
            "token_endpoint": exchanger.endpoint_id,
            "passthrough": cfg.passthrough,
        },
    )
    if not os.access(cfg.federated_token_file, os.R_OK):
        # Not fatal: a late mount is answered 503 with Retry-After until the file is there.
        log.warning(
            "cannot read the federated token file yet: token requests fail until it can be read",
            extra={"path": cfg.federated_token_file},
        )
    lifetime = Lifetime()
    if passthrough is None:
        lifetime.in_background(warm_up(endpoint, lifetime.fail, delay_s=WARM_UP_DELAY_S))
    # Pass-through's start-up check needs httpx and anyio's backend: both are imported now,
    # before the first /readyz is answered, as they always were. Deferred past /readyz, they
    # made /readyz 0.55x as late but a token asked for the moment /readyz answered 23 to 69
    # ms slower (bench/README item 27), and what is deferred must never land on the token path.
    elif await warm_up(endpoint, lifetime.fail):
        lifetime.in_background(check_passthrough_loop(passthrough))
    await lifetime.until_stopped()

    log.info("shutting down", extra={"grace_s": server.state.limits.shutdown_grace_s})
    app.ready = False
    await server.shutdown()
    if metrics_server is not None:
        await metrics_server.shutdown()
    lifetime.cancel_background()
    await cache.aclose()
    await close_outbound(endpoint, passthrough, access_log)
    return lifetime.exit_code


def run_proxy(cfg: ProxyConfig, writer: LineWriter | None = None) -> int:
    """Serve until SIGTERM; `writer` is the one stderr writer logs.configure made, if any."""
    started = time.monotonic()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(cfg, started, writer))
