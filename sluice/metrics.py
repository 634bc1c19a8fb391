"""Prometheus metrics shared by the Sluice processes."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

__all__ = [
    "BATCH_SIZE",
    "ENGINE_SECONDS",
    "KAFKA_CLIENT_ERRORS",
    "REQUESTS",
    "SINK_ROWS",
    "serve_metrics",
]

REQUESTS = Counter("sluice_requests_total", "Requests finished by a GPU consumer", ["model", "status"])
BATCH_SIZE = Histogram(
    "sluice_batch_size",
    "Requests per engine batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
ENGINE_SECONDS = Histogram("sluice_engine_seconds", "Engine time per batch", ["model"])
KAFKA_CLIENT_ERRORS = Counter(
    "sluice_kafka_client_errors_total", "Errors reported by Kafka clients (error_cb)", ["component", "class"]
)
SINK_ROWS = Counter("sluice_sink_rows_total", "Rows written to ClickHouse", ["table"])


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    start_http_server(port, addr=addr)
