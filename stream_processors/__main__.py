"""``python -m stream_processors``: run the router as a Faust worker (settings from SLUICE_*)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import faust
from prometheus_client.core import GaugeMetricFamily

from core.lifecycle import die_with_parent
from core.logs import setup_logging
from core.metrics import gauge_family, register_collector, serve_metrics
from core.settings import Settings
from stream_processors.app import create_app


def _backlog_gauges(app: faust.App) -> Iterator[GaugeMetricFamily]:
    backlog = app.pipeline.router.backlog
    models = [m.name for m in app.pipeline.emit.catalog]
    now = time.time()
    yield gauge_family(
        "sluice_model_queued_requests",
        "Requests routed to a model and not yet answered (this router's share): the scaling signal",
        ["model"],
        [([m], backlog.get(m)) for m in models],
    )
    yield gauge_family(
        "sluice_model_oldest_queued_seconds",
        "Age of the oldest request routed to a model and not yet answered (this router's share)",
        ["model"],
        [([m], backlog.oldest_age(m, now)) for m in models],
    )
    quota = app.pipeline.quota
    if quota is not None:
        usage = quota.usage()
        yield gauge_family(
            "sluice_enqueued_tokens",
            "Tokens (prompt estimate + max_tokens) a tenant has queued or running, against its quota",
            ["tenant"],
            [([t], n) for t, n in usage.items()],
        )
        yield gauge_family(
            "sluice_token_quota",
            "A tenant's quota of enqueued tokens",
            ["tenant"],
            [([t], q) for t, q in quota.quotas.items()],
        )
        keys = quota.key_usage()
        yield gauge_family(
            "sluice_key_enqueued_tokens",
            "Tokens an API key with a quota has queued or running (key: its public id, never the key)",
            ["key"],
            [([k], used) for k, (used, _) in keys.items()],
        )
        yield gauge_family(
            "sluice_key_token_quota",
            "An API key's quota of enqueued tokens",
            ["key"],
            [([k], q) for k, (_, q) in keys.items()],
        )
    if app.semantic is not None:
        yield gauge_family(
            "sluice_semantic_cache_entries",
            "Answered requests in the semantic cache index held by this router",
            [],
            [([], app.semantic.entry_count())],
        )


def main() -> None:
    setup_logging()
    die_with_parent()
    settings = Settings()
    app = create_app(settings)
    if app.sender is not None:
        app.sender.open()
    register_collector(lambda: _backlog_gauges(app))
    serve_metrics(settings.metrics)
    # Started programmatically rather than through Faust's click CLI (see pyproject.toml).
    worker = faust.Worker(app, loglevel=logging.getLogger().level, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
