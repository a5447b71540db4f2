"""Prometheus text from a live proxy's metrics port, read as {(sample, labels): value}.

Owns: scraping `/metrics` over a real socket and parsing it with prometheus-client's own
text parser (the format's reference reader).
Must not know: the proxy's internals.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from support.proxyproc import http_request


def scrape(metrics_port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics on the metrics port: {(sample name, labels): value}."""
    response = http_request(metrics_port, "/metrics", timeout_s=5)
    assert response.status == 200, response
    # prometheus-client ≥ 0.22 says version=1.0.0 (Prometheus 3's PrometheusText1.0.0), older 0.0.4.
    assert re.match(r"text/plain; version=(0\.0\.4|1\.0\.0)",
                    response.headers["content-type"]), response
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def labelled(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
             label: str | None = None) -> dict[Any, float]:
    """The values of one sample name, keyed by its labels (or by one label's value)."""
    found: dict[Any, float] = {}
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            key: Any = dict(labels).get(label) if label else tuple(sorted(labels))
            found[key] = value
    return found
