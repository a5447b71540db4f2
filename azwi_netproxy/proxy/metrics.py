"""Prometheus metrics, counted in plain integers on the hot path and exported at scrape time.

prometheus-client's own Counter takes a lock per increment, and a cache hit costs only a
few microseconds in all, so the request path bumps dict entries here and a collector turns
them into metric families when Prometheus scrapes. prometheus-client itself is imported
by `prepare`, which the proxy calls at start only with --metrics-port: pods without it
never load it (about 1.4 MB of memory and 30 ms of CPU).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

NAMESPACE: Final = "azwi_netproxy"
EXCHANGE_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        # 200s on the token route, counted apart from `requests` (and added to it when
        # scraped): bumped on every cache hit, where an int attribute costs a quarter of
        # a dict entry keyed by a tuple.
        self.token_ok = 0
        self.exchanges: defaultdict[str, int] = defaultdict(int)
        self.cache_events: defaultdict[str, int] = defaultdict(int)
        # Targets refused because they could name the identity endpoint (or are not origin-form).
        self.passthrough_refused = 0
        # Histogram of exchange latency: one counter per bucket (+Inf last), and the sum.
        self.exchange_buckets = [0] * (len(EXCHANGE_BUCKETS_S) + 1)
        self.exchange_seconds_sum = 0.0
        self.earliest_expiry: Callable[[], float | None] = lambda: None
        self.cached_tokens: Callable[[], int] = lambda: 0
        self.log_lines_dropped: Callable[[], int] = lambda: 0
        # The cache counts its hits itself (see TokenCache.hits); added to cache_events.
        self.cache_hits: Callable[[], int] = lambda: 0
        # Node mode: how many pods the node process serves (the gauge is absent in a sidecar).
        self.pods: Callable[[], int] | None = None
        self._registry: CollectorRegistry | None = None

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def count_cache(self, event: str) -> None:
        self.cache_events[event] += 1

    def count_exchange(self, outcome: str, seconds: float) -> None:
        self.exchanges[outcome] += 1
        self.exchange_buckets[bisect.bisect_left(EXCHANGE_BUCKETS_S, seconds)] += 1
        self.exchange_seconds_sum += seconds

    def prepare(self) -> CollectorRegistry:
        """The registry scrapes read, made (and prometheus-client imported) at the first call.

        Raises:
            ImportError: prometheus-client cannot be imported.
        """
        if self._registry is None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.process_collector import ProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            ProcessCollector(namespace=NAMESPACE, registry=registry)
            self._registry = registry
        return self._registry

    def render(self) -> tuple[bytes, bytes]:
        """The exposition text and its content type."""
        registry = self.prepare()
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self._m
        requests = CounterMetricFamily(
            f"{NAMESPACE}_requests", "Requests answered, by route and status", labels=["route", "status"]
        )
        answered = dict(m.requests)
        if m.token_ok:
            answered[("token", 200)] = answered.get(("token", 200), 0) + m.token_ok
        for (route, status), count in sorted(answered.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        exchanges = CounterMetricFamily(
            f"{NAMESPACE}_exchanges", "Token exchanges, by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(m.exchanges.items()):
            exchanges.add_metric([outcome], count)
        yield exchanges
        refused = CounterMetricFamily(
            f"{NAMESPACE}_passthrough_refused",
            "Targets refused, never passed through: not origin-form, or a segment that could name "
            "the identity endpoint",
        )
        refused.add_metric([], m.passthrough_refused)
        yield refused
        cache = CounterMetricFamily(
            f"{NAMESPACE}_cache_events",
            "Token cache events: hit, miss, refresh, stale, evict, refresh_failed",
            labels=["event"],
        )
        events = dict(m.cache_events)
        if hits := m.cache_hits():
            events["hit"] = events.get("hit", 0) + hits
        for event, count in sorted(events.items()):
            cache.add_metric([event], count)
        yield cache
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, EXCHANGE_BUCKETS_S), "+Inf"), m.exchange_buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        histogram = HistogramMetricFamily(
            f"{NAMESPACE}_exchange_duration_seconds",
            "Latency of token exchanges (retries included)",
        )
        histogram.add_metric([], cumulative, sum_value=m.exchange_seconds_sum)
        yield histogram
        dropped = CounterMetricFamily(
            f"{NAMESPACE}_log_dropped_lines",
            "Log lines (access lines and others) dropped because the reader of stderr did not keep up",
        )
        dropped.add_metric([], m.log_lines_dropped())
        yield dropped
        size = GaugeMetricFamily(f"{NAMESPACE}_cached_tokens", "Tokens in the cache")
        size.add_metric([], m.cached_tokens())
        yield size
        earliest = m.earliest_expiry()
        expiry = GaugeMetricFamily(
            f"{NAMESPACE}_earliest_token_expiry_seconds",
            "Seconds until the earliest cached token expires (absent when the cache is empty)",
        )
        if earliest is not None:
            expiry.add_metric([], max(earliest - time.time(), 0.0))
        yield expiry
        if m.pods is not None:
            pods = GaugeMetricFamily(f"{NAMESPACE}_node_pods", "Pods the node process serves")
            pods.add_metric([], m.pods())
            yield pods

    def describe(self) -> list[Any]:
        return []
