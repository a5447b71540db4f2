"""The node process of node mode, `azwi-netproxy-node`: one per node, every opted-in pod served.

It is the sidecar's request path serving many pods, not a second server: the same server,
app, cache, exchange, identity binding, metrics and logs, with one listener per pod inside
the pod's own network namespace (pods.py) and the pod's context in that listener's app (its
name in every log line, its identities, its token file under the kubelet's pods dir, its
own cache). What is per node: the exchange client (one pooled connection set to Entra),
the metrics, the log writer, and pass-through (off unless AZWI_NODE_PASSTHROUGH=all).

Start-up order, so that a restart serves every live pod again within a few seconds and
never a deleted one: serve the pods of the CNI plugin's records (replay), then open the
control socket for new ADDs and DELs, then drop what a DEL removed meanwhile (reconcile),
and reconcile again every few seconds (which also retries a pod that could not be served).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import uvloop

from azwi_netproxy import __version__
from azwi_netproxy.enrolment import Enrolment, from_json
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.logs import AccessLog, LineWriter
from azwi_netproxy.nodecontrol import control_socket_path, has_record, read_records
from azwi_netproxy.proxy.app import TokenApp
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.config import NodeConfig
from azwi_netproxy.proxy.control import ControlServer
from azwi_netproxy.proxy.entra import Endpoint, ExchangePolicy, Exchanger
from azwi_netproxy.proxy.metrics import Metrics
from azwi_netproxy.proxy.passthrough import Passthrough
from azwi_netproxy.proxy.pods import PodApp, PodRefused, PodRegistry
from azwi_netproxy.proxy.podtoken import find_token_file, pattern, token_reader
from azwi_netproxy.proxy.router import Router
from azwi_netproxy.proxy.run import (
    WARM_UP_DELAY_S,
    Lifetime,
    MetricsApp,
    close_outbound,
    make_access_log,
    make_endpoint,
    make_passthrough,
    warm_up,
)
from azwi_netproxy.proxy.server import HttpServer
from azwi_netproxy.settings import NODE_CLIENT_ID_ANNOTATION, NODE_TENANT_ID_ANNOTATION

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S: Final = 5.0
# A pod asks with a few targets; a memo as large as the sidecar's, per pod, would let one
# pod's app hold a megabyte.
NODE_MEMO_LIMIT: Final = 128
MSG_NO_DEFAULT: Final = (
    f"No client_id in the request and the pod has no default identity: annotate the pod with "
    f"{NODE_CLIENT_ID_ANNOTATION} or pass client_id"
)


class PodApps:
    """Builds each pod's app on the parts every pod shares."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        endpoint: Endpoint,
        passthrough: Passthrough | None,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        self._cfg = cfg
        self._endpoint = endpoint
        self._policy = ExchangePolicy(timeout_s=cfg.exchange_timeout_s, deadline_s=cfg.exchange_deadline_s)
        self._passthrough = passthrough
        self._metrics = metrics
        self._access_log = access_log

    def build(self, enrolment: Enrolment) -> PodApp:
        """The pod's app: its identities, its token file, its own cache.

        Raises:
            ConfigError: the pod names no tenant and the node has none, or its map is bad.
        """
        cfg = self._cfg
        tenant_id = enrolment.tenant_id or cfg.tenant_id
        if tenant_id is None:
            raise ConfigError(
                f"{NODE_TENANT_ID_ANNOTATION} is not set and the node process has no AZURE_TENANT_ID"
            )
        router = Router(
            default_client_id=enrolment.client_id,
            tenant_id=tenant_id,
            identity_map=enrolment.parsed_identity_map(),
            no_default=MSG_NO_DEFAULT,
        )
        log_extra = {"pod": enrolment.pod}
        exchanger = Exchanger(
            self._endpoint,
            token_reader(cfg.kubelet_pods_dir, enrolment.pod_uid),
            policy=self._policy,
            on_result=self._metrics.count_exchange,
            log_extra=log_extra,
        )
        # Keyed by pod, by construction: this cache is reached only through this pod's
        # listener, so a token obtained with one pod's service account token is never
        # answered to another pod, whatever client, tenant and resource they ask for.
        cache = TokenCache(
            exchanger,
            max_entries=cfg.cache_max_entries,
            on_event=self._metrics.count_cache,
            log_extra=log_extra,
        )
        app = TokenApp(
            router=router,
            cache=cache,
            endpoint_id=exchanger.endpoint_id,
            passthrough=self._passthrough,
            metrics=self._metrics,
            access_log=self._access_log,
            pod=enrolment.pod,
            memo_limit=NODE_MEMO_LIMIT,
        )
        if find_token_file(cfg.kubelet_pods_dir, enrolment.pod_uid) is None:
            # Not fatal, as in the sidecar: a late projection is answered 503 until it is there.
            log.warning(
                "cannot find the pod's service account token yet: its token requests fail until it is there",
                extra={"pod": enrolment.pod, "path": pattern(cfg.kubelet_pods_dir, enrolment.pod_uid)},
            )
        return PodApp(app, cache)


class Control:
    """What the CNI plugin's requests mean (nodecontrol.py has their format)."""

    def __init__(self, registry: PodRegistry) -> None:
        self._registry = registry

    async def handle(self, message: dict[str, Any], fd: int | None) -> dict[str, Any]:
        op = message.get("op")
        if op == "ping":
            return {"ok": True, "pods": len(self._registry)}
        if op == "add":
            if fd is None:
                return {"ok": False, "kind": "invalid", "error": "add needs the pod's network namespace"}
            try:
                enrolment = from_json(str(message.get("enrolment", "")))
            except ConfigError as exc:
                return {"ok": False, "kind": "invalid", "error": str(exc)}
            try:
                await self._registry.add(enrolment, fd)
            except PodRefused as exc:
                log.warning("cannot serve pod", extra={"pod": enrolment.pod, "error": str(exc)})
                return {"ok": False, "kind": exc.kind, "error": str(exc)}
            return {"ok": True}
        container_id = message.get("container_id")
        if not isinstance(container_id, str):
            return {"ok": False, "kind": "invalid", "error": "no container_id"}
        if op == "del":
            return {"ok": True, "dropped": await self._registry.drop(container_id, reason="DEL")}
        if op == "check":
            return {"ok": True, "serving": container_id in self._registry}
        return {"ok": False, "kind": "invalid", "error": f"unknown op {op!r}"}


def _sum_of(registry: PodRegistry, figure: Callable[[TokenCache], int]) -> Callable[[], int]:
    return lambda: sum(figure(cache) for cache in registry.caches())


async def _reconcile_every(registry: PodRegistry, run_dir: str) -> None:
    while True:
        await asyncio.sleep(RECONCILE_INTERVAL_S)
        await registry.reconcile(read_records(run_dir), functools.partial(has_record, run_dir))


async def serve_node(cfg: NodeConfig, started: float, writer: LineWriter | None = None) -> int:
    metrics = Metrics()
    endpoint = make_endpoint(cfg)
    passthrough = make_passthrough(cfg)
    access_log = make_access_log(writer)
    server = HttpServer()
    apps = PodApps(cfg, endpoint=endpoint, passthrough=passthrough, metrics=metrics, access_log=access_log)
    registry = PodRegistry(server=server, build=apps.build)
    metrics.cached_tokens = _sum_of(registry, len)
    metrics.cache_hits = _sum_of(registry, lambda cache: cache.hits)
    metrics.earliest_expiry = lambda: min(
        (e for cache in registry.caches() if (e := cache.earliest_expiry()) is not None), default=None
    )
    metrics.log_lines_dropped = lambda: access_log.dropped_lines
    metrics.pods = lambda: len(registry)
    control = ControlServer(control_socket_path(cfg.run_dir), Control(registry).handle)
    enrolled = functools.partial(has_record, cfg.run_dir)
    metrics_server: HttpServer | None = None
    try:
        if cfg.metrics_port is not None:
            metrics_server = HttpServer(MetricsApp(metrics))
            await metrics_server.start("0.0.0.0", cfg.metrics_port)
        await registry.replay(read_records(cfg.run_dir), enrolled)
        await control.start()
    except OSError as exc:
        log.error("cannot start the node process", extra={"error": str(exc)})
        await registry.aclose()
        if metrics_server is not None:
            await metrics_server.shutdown()
        await endpoint.aclose()
        return 1
    # A DEL while this process started (the record removed after replay read it).
    await registry.reconcile(read_records(cfg.run_dir), enrolled)
    log.info(
        "node process started",
        extra={
            "version": __version__,
            "pods": len(registry),
            "startup_ms": round((time.monotonic() - started) * 1000, 1),
            "control_socket": str(control_socket_path(cfg.run_dir)),
            "kubelet_pods_dir": cfg.kubelet_pods_dir,
            "token_endpoint": endpoint.endpoint_id,
            "passthrough": cfg.passthrough,
            "metrics_port": cfg.metrics_port,
        },
    )
    # As the sidecar: what exchanges import, once, a moment after the pods are served; a
    # module that cannot be imported stops the process rather than fail every exchange.
    lifetime = Lifetime()
    lifetime.in_background(warm_up(endpoint, lifetime.fail, delay_s=WARM_UP_DELAY_S))
    lifetime.in_background(_reconcile_every(registry, cfg.run_dir))
    await lifetime.until_stopped()

    log.info("shutting down", extra={"pods": len(registry)})
    lifetime.cancel_background()
    await control.close()
    # The pods' listeners close with the server: their clients are refused until the next
    # node process serves them again (the records stay for it).
    await server.shutdown()
    await registry.aclose()
    if metrics_server is not None:
        await metrics_server.shutdown()
    await close_outbound(endpoint, passthrough, access_log)
    return lifetime.exit_code


def run_node(cfg: NodeConfig, writer: LineWriter | None = None) -> int:
    """Serve until SIGTERM; `writer` is the one stderr writer logs.configure made, if any."""
    started = time.monotonic()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve_node(cfg, started, writer))
