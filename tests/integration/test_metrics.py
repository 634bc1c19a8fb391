"""Every process of a local stack serves Prometheus metrics and a health check, listed in the stack
file; the scaling gauges follow a backlog as it forms and drains. Scraped over HTTP and parsed
with prometheus_client's own parser, as Prometheus would read them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from analytics.store import Store
from core.settings import Settings
from producers import SluiceClient
from sluice.local.stack import LocalStack
from tests.integration.helpers import results
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels -> value} of every sample on ``url`` (histogram/counter suffixes kept)."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _health(metrics_url: str) -> tuple[int, str] | None:
    try:
        r = httpx.get(metrics_url.replace("/metrics", "/healthz"), timeout=5)
    except httpx.TransportError:
        return None
    return r.status_code, r.text.strip()


def value(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return sum(v for k, v in metrics.get(name, {}).items() if all((lk, lv) in k for lk, lv in labels.items()))


def test_every_process_serves_metrics_and_health(settings: Settings, clickhouse_store: Store, tmp_path: Path) -> None:
    # A slow engine with room for 2: a backlog forms and drains while we watch.
    settings = settings.evolve(engine={"instant_token_seconds": 0.05, "max_inflight": 2})
    stack = LocalStack(settings, store=clickhouse_store, run_gateway=True).start()
    try:
        urls = stack.metrics_urls
        assert set(urls) == {"stack", "sink", "processor", "gpu-tiny", "gpu-big", "gateway"}
        # stack.json lists the endpoints once they answer (written again with ready=true).
        assert stack.ready.wait(90)
        info = json.loads((stack.settings.data_dir / "stack.json").read_text())
        assert info["metrics_urls"] == urls and info["ready"] is True
        for name, url in urls.items():
            # A child serves its endpoint once it has started (a consumer says 503 while loading).
            answer = wait_until(
                lambda url=url: _health(url), lambda h: h == (200, "ok"), timeout=90, what=f"{name} healthy"
            )
            assert answer == (200, "ok"), name

        client = SluiceClient(stack.settings)
        ids = [client.submit(f"metrics question {i}", model="tiny", max_tokens=16) for i in range(30)]
        client.flush()
        router = urls["processor"]
        queued = wait_until(
            lambda: scrape(router),
            lambda m: (
                value(m, "sluice_model_queued_requests", model="tiny") >= 10
                and value(m, "sluice_model_oldest_queued_seconds", model="tiny") > 0
            ),
            timeout=60,
            what="the router's queued-requests gauge to show the backlog",
        )
        assert value(queued, "sluice_model_queued_requests", model="big") == 0
        consumer = scrape(urls["gpu-tiny"])
        assert value(consumer, "sluice_buffered_requests", model="tiny") > 0
        assert "sluice_paused_partitions" in consumer

        wait_until(lambda: results(clickhouse_store, ids), lambda r: len(r) == 30, timeout=180, what="every result")
        drained = wait_until(
            lambda: scrape(router),
            lambda m: value(m, "sluice_model_queued_requests", model="tiny") == 0,
            timeout=60,
            what="the queued-requests gauge to drain",
        )
        assert value(drained, "sluice_model_oldest_queued_seconds", model="tiny") == 0

        consumer = scrape(urls["gpu-tiny"])
        assert value(consumer, "sluice_requests_total", model="tiny", status="succeeded") == 30
        assert value(consumer, "sluice_tokens_total", model="tiny", kind="completion") > 0
        assert value(consumer, "sluice_tokens_total", model="tiny", kind="prompt") > 0
        assert value(consumer, "sluice_queue_wait_seconds_count", model="tiny") == 30
        assert value(consumer, "sluice_request_latency_seconds_count", model="tiny", source="engine") == 30
        assert value(consumer, "sluice_cost_usd_total", model="tiny", tenant="default") > 0
        assert value(consumer, "sluice_buffered_requests", model="tiny") == 0

        # A duplicate and an unknown model: the router answers and dead-letters, and says so.
        client.submit("metrics question 0", model="tiny", max_tokens=16)
        client.submit("no such model", model="nope", max_tokens=16)
        client.flush()
        wait_until(
            lambda: scrape(router),
            lambda m: (
                value(m, "sluice_cache_hits_total", kind="exact") == 1
                and value(m, "sluice_dead_letters_total", reason="unknown_model", stage="processor") == 1
            ),
            timeout=60,
            what="the router's cache-hit and dead-letter counters",
        )
        sink = scrape(urls["sink"])
        assert value(sink, "sluice_sink_rows_total", table="results") >= 30
        gateway = scrape(urls["gateway"])
        httpx.get(stack.gateway_url + "/v1/batches", timeout=10)  # no key: 401, counted by route
        gateway = scrape(urls["gateway"])
        assert value(gateway, "sluice_http_requests_total", route="/v1/batches", status="401") >= 1
    finally:
        stack.stop()
