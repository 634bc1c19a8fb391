"""``python -m gpu_consumers --model NAME``: one GPU consumer (settings from SLUICE_*)."""

from __future__ import annotations

import argparse
import signal
import threading

from gpu_consumers.engine import create_engine
from gpu_consumers.worker import GpuWorker
from sluice.catalog import load_catalog
from sluice.lifecycle import die_with_parent
from sluice.logs import setup_logging
from sluice.metrics import serve_metrics
from sluice.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpu_consumers")
    parser.add_argument("--model", required=True, help="catalog model name to serve")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port")
    args = parser.parse_args(argv)
    setup_logging()
    die_with_parent()
    settings = Settings()
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(args.model)
    if entry is None:
        parser.error(f"model {args.model!r} is not in the catalog")
    if args.metrics_port:
        serve_metrics(args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = create_engine(settings.engine, entry, settings.data_dir)
    try:
        GpuWorker(settings, catalog, entry.name, engine).run(stop)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
