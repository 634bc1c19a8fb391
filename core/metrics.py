"""Prometheus metrics of the Sluice processes, and the endpoint each process serves them on.

Every process (router, GPU consumers, gateway, ``sluice up`` with its sink) serves
``GET /metrics`` (the text exposition format) and ``GET /healthz`` on ``SLUICE_METRICS__HOST`` /
``__PORT`` (127.0.0.1 and a free port by default; ``sluice up`` assigns one per child and lists
them in ``stack.json`` under ``metrics_urls``). Names follow Prometheus conventions: a
``sluice_`` namespace, base units (seconds, USD), ``_total`` on counters.

The scaling signal (``sluice_model_queued_requests``, ``sluice_model_oldest_queued_seconds``)
comes from what the router knows: requests it routed to a model and has not yet seen a result
for. It is read at scrape time through :func:`register_collector`, never from broker watermarks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas import AvroRecord, CacheKind, CostMetric, DeadLetter, InferenceResult

__all__ = [
    "AT_RISK",
    "CACHE_HITS",
    "CHILD_RESTARTS",
    "COST",
    "DEAD_LETTERS",
    "DEDUPE_PATH",
    "DEDUPLICATED",
    "ENGINE_INFLIGHT",
    "ENGINE_SECONDS",
    "HTTP_REQUESTS",
    "HTTP_SECONDS",
    "KAFKA_CLIENT_ERRORS",
    "LATENCY",
    "PREEMPTED",
    "QUEUE_WAIT",
    "REQUESTS",
    "ROUTED",
    "SINK_ERRORS",
    "SINK_ROWS",
    "TOKENS",
    "MetricsServer",
    "gauge_family",
    "observe_records",
    "register_collector",
    "serve_metrics",
]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)

REQUESTS = Counter("sluice_requests_total", "Requests finished by a GPU consumer", ["model", "status"])
ENGINE_INFLIGHT = Gauge("sluice_engine_inflight_requests", "Requests in the engine", ["model"])
PREEMPTED = Counter(
    "sluice_engine_preemptions_total", "Running requests aborted and re-queued for a higher priority", ["model"]
)
ENGINE_SECONDS = Histogram(
    "sluice_engine_step_seconds",
    "Engine time per step",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
TOKENS = Counter("sluice_tokens_total", "Tokens run by the engines", ["model", "kind"])
QUEUE_WAIT = Histogram(
    "sluice_queue_wait_seconds",
    "From a request's creation to the engine starting it",
    ["model", "priority"],
    buckets=_LATENCY_BUCKETS,
)
LATENCY = Histogram(
    "sluice_request_latency_seconds",
    "From a request's creation to its result (engine results and answers from the router)",
    ["model", "priority", "source"],
    buckets=_LATENCY_BUCKETS,
)
COST = Counter("sluice_cost_usd_total", "Cost of the tokens run, in USD", ["tenant", "model"])
DEAD_LETTERS = Counter("sluice_dead_letters_total", "Dead letters written", ["reason", "stage"])
AT_RISK = Counter(
    "sluice_at_risk_requests_total", "Requests said to be at risk of missing their deadline", ["model", "priority"]
)
ROUTED = Counter("sluice_routed_requests_total", "Requests the router sent to a model topic", ["model", "priority"])
DEDUPE_PATH = Counter(
    "sluice_dedupe_requests_total",
    "Requests the router deduplicated, by path: on the partition they arrived on (local) or after "
    "the repartition hop (repartitioned: a key from another producer)",
    ["path"],
)
DEDUPLICATED = Counter("sluice_deduplicated_requests_total", "Requests answered with another request's result")
CACHE_HITS = Counter("sluice_cache_hits_total", "Requests answered from the response cache", ["kind"])
KAFKA_CLIENT_ERRORS = Counter(
    "sluice_kafka_client_errors_total", "Errors reported by Kafka clients (error_cb)", ["component", "class"]
)
CHILD_RESTARTS = Counter("sluice_child_restarts_total", "Children of a local stack restarted after dying", ["child"])
SINK_ROWS = Counter("sluice_sink_rows_total", "Rows written to ClickHouse", ["table"])
HTTP_REQUESTS = Counter("sluice_http_requests_total", "Gateway HTTP requests", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "sluice_http_request_duration_seconds",
    "Gateway HTTP request duration",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
SINK_ERRORS = Counter("sluice_sink_errors_total", "Failed ClickHouse inserts", ["table", "kind"])


def observe_records(records: Iterable[AvroRecord | bytes | None], *, source: str) -> None:
    """Count what a stage is about to publish: results (latency; tokens for engine results),
    cost metrics and dead letters. ``source``: ``engine`` or ``router``."""
    for record in records:
        if isinstance(record, InferenceResult):
            LATENCY.labels(record.model, record.priority, source).observe(record.latency_ms / 1000)
            if record.engine_run_id:
                TOKENS.labels(record.model, "prompt").inc(record.prompt_tokens)
                TOKENS.labels(record.model, "completion").inc(record.completion_tokens)
                QUEUE_WAIT.labels(record.model, record.priority).observe(max(0, record.queue_wait_ms) / 1000)
            elif record.cached:
                CACHE_HITS.labels(str(record.cache_kind or CacheKind.EXACT)).inc()
            elif record.deduplicated_from:
                DEDUPLICATED.inc()
        elif isinstance(record, CostMetric):
            if record.cost_usd:
                COST.labels(record.tenant, record.model).inc(record.cost_usd)
        elif isinstance(record, DeadLetter):
            DEAD_LETTERS.labels(record.reason.value, record.stage).inc()


def gauge_family(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


class _Callback(Collector):
    def __init__(self, fn: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self.fn = fn

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            yield from self.fn()
        except Exception:  # a scrape must not fail because one reading did
            logger.exception("metrics collector failed")


def register_collector(fn: Callable[[], Iterable[GaugeMetricFamily]]) -> Collector:
    """Gauges read at scrape time from a process's own state (buffers, backlogs)."""
    collector = _Callback(fn)
    REGISTRY.register(collector)
    return collector


class MetricsServer:
    """``/metrics`` and ``/healthz`` in a daemon thread. ``health`` returns None when healthy, else
    why not (``/healthz`` answers 503 with it)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, health: Callable[[], str | None] | None = None) -> None:
        check = health or (lambda: None)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif self.path.split("?")[0] in ("/healthz", "/health"):
                    problem = check()
                    self._send(503 if problem else 200, (problem or "ok").encode() + b"\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics on %s (health on /healthz)", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(settings: Any, health: Callable[[], str | None] | None = None) -> MetricsServer | None:
    """Start the endpoint ``settings`` (a :class:`core.settings.MetricsSettings`) asks for."""
    if not settings.enabled:
        return None
    return MetricsServer(settings.host, settings.port, health).start()
