"""Prometheus metrics, counted in plain integers on the hot path and exported at scrape time.

prometheus-client's own Counter takes a lock per increment; a token answer costs about
ten microseconds in all, so the request path only bumps dict entries here and a custom
collector turns them into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

NAMESPACE: Final = "azwi_netproxy"


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.exchanges: defaultdict[str, int] = defaultdict(int)
        self.cache_events: defaultdict[str, int] = defaultdict(int)
        self.registry = CollectorRegistry(auto_describe=False)
        self.exchange_seconds = Histogram(
            "exchange_duration_seconds",
            "Latency of token exchanges with Entra (or the identity-binding proxy), retries included",
            namespace=NAMESPACE,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
            registry=self.registry,
        )
        self.earliest_expiry: Callable[[], float | None] = lambda: None
        self.cached_tokens: Callable[[], int] = lambda: 0
        self.registry.register(_Collector(self))
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def count_cache(self, event: str) -> None:
        self.cache_events[event] += 1

    def count_exchange(self, outcome: str, seconds: float) -> None:
        self.exchanges[outcome] += 1
        self.exchange_seconds.observe(seconds)

    def render(self) -> tuple[bytes, bytes]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{NAMESPACE}_requests", "Requests answered, by route and status", labels=["route", "status"]
        )
        for (route, status), count in sorted(self._m.requests.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        exchanges = CounterMetricFamily(
            f"{NAMESPACE}_exchanges", "Token exchanges, by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(self._m.exchanges.items()):
            exchanges.add_metric([outcome], count)
        yield exchanges
        cache = CounterMetricFamily(
            f"{NAMESPACE}_cache_events",
            "Token cache events: hit, miss, refresh (background), stale, evict, refresh_failed",
            labels=["event"],
        )
        for event, count in sorted(self._m.cache_events.items()):
            cache.add_metric([event], count)
        yield cache
        size = GaugeMetricFamily(f"{NAMESPACE}_cached_tokens", "Tokens in the cache")
        size.add_metric([], self._m.cached_tokens())
        yield size
        earliest = self._m.earliest_expiry()
        expiry = GaugeMetricFamily(
            f"{NAMESPACE}_earliest_token_expiry_seconds",
            "Seconds until the earliest cached token expires (absent when the cache is empty)",
        )
        if earliest is not None:
            expiry.add_metric([], max(earliest - time.time(), 0.0))
        yield expiry
