"""Prometheus metrics shared by the Sluice processes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "CHILD_RESTARTS",
    "ENGINE_INFLIGHT",
    "ENGINE_SECONDS",
    "KAFKA_CLIENT_ERRORS",
    "REQUESTS",
    "SINK_ROWS",
    "serve_metrics",
]

REQUESTS = Counter("sluice_requests_total", "Requests finished by a GPU consumer", ["model", "status"])
ENGINE_INFLIGHT = Gauge("sluice_engine_inflight_requests", "Requests in the engine", ["model"])
ENGINE_SECONDS = Histogram(
    "sluice_engine_step_seconds",
    "Engine time per step",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
KAFKA_CLIENT_ERRORS = Counter(
    "sluice_kafka_client_errors_total", "Errors reported by Kafka clients (error_cb)", ["component", "class"]
)
CHILD_RESTARTS = Counter("sluice_child_restarts_total", "Children of a local stack restarted after dying", ["child"])
SINK_ROWS = Counter("sluice_sink_rows_total", "Rows written to ClickHouse", ["table"])


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    start_http_server(port, addr=addr)
