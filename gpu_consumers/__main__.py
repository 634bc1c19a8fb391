"""``python -m gpu_consumers --model NAME``: one GPU consumer (settings from SLUICE_*)."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

from core.catalog import load_catalog
from core.lifecycle import die_with_parent
from core.logs import setup_logging
from core.metrics import gauge_family, register_collector, serve_metrics
from core.settings import Settings
from gpu_consumers.engine import create_engine
from gpu_consumers.worker import GpuWorker
from schemas import Priority


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpu_consumers")
    parser.add_argument("--model", required=True, help="catalog model name to serve")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: SLUICE_METRICS__PORT)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    die_with_parent()
    settings = Settings()
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(args.model)
    if entry is None:
        parser.error(f"model {args.model!r} is not in the catalog")
    if args.metrics_port is not None:
        settings = settings.evolve(metrics={"port": args.metrics_port})
    # /healthz answers 503 while the model loads (minutes for a large one), then 200.
    problem: list[str | None] = ["loading the engine"]
    serve_metrics(settings.metrics, lambda: problem[0])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = create_engine(settings.engine, entry, settings.data_dir)
    try:
        worker = GpuWorker(settings, catalog, entry.name, engine)
        register_collector(lambda: consumer_gauges(worker))
        problem[0] = None
        worker.run(stop)
    finally:
        engine.close()


def consumer_gauges(worker: GpuWorker) -> Iterator[GaugeMetricFamily]:
    model = worker.entry.name
    yield gauge_family(
        "sluice_buffered_requests",
        "Requests fetched and waiting in this consumer's priority buffer",
        ["model", "priority"],
        [([model, p.value], worker.buffer.depth(p.rank)) for p in Priority],
    )
    acquired = worker.acquired
    if acquired is not None:
        yield gauge_family(
            "sluice_acquired_requests",
            "Share mode: requests this consumer acquired and has not acknowledged yet",
            ["model"],
            [([model], acquired)],
        )
        yield gauge_family(
            "sluice_share_acknowledgements",
            "Share mode: acknowledgements this consumer sent, by kind (accept, release, reject)",
            ["model", "kind"],
            [([model, kind], n) for kind, n in worker.acknowledged.items()],
        )
    speed = worker.pace.tokens_per_second
    yield gauge_family(
        "sluice_engine_decode_tokens_per_second",
        "Measured tokens per second one running request gains (what deadline slack is estimated with)",
        ["model"],
        [([model], speed)] if speed is not None else [],
    )
    paused = [tp for p in worker.flow.paused for tp in worker.flow.assigned.get(p, ())]
    yield gauge_family(
        "sluice_paused_partitions",
        "Partitions this consumer paused because their priority's buffer is full",
        ["model"],
        [([model], len(paused))],
    )


if __name__ == "__main__":
    main()
