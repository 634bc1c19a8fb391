"""``sluice topics``, ``sink`` and ``bench``: deployment and measurement."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
import threading

from core.errors import ConfigError
from sluice.cli.common import add_command, settings_from

__all__ = ["register"]


def cmd_topics(args: argparse.Namespace) -> int:
    from core.catalog import load_catalog
    from core.topics import Topics, ensure_topics

    settings = settings_from(args)
    topics = Topics(settings.topic_prefix).pipeline(
        load_catalog(settings.catalog_path), settings.processor.app_id, len(settings.retry.backoff_ms), settings.tenants
    )
    ensure_topics(settings.kafka, topics)
    for name in topics:
        print(name)
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from analytics.sink import ClickHouseSink
    from analytics.store import Store
    from core.metrics import serve_metrics

    settings = settings_from(args)
    store = Store.from_settings(settings)
    store.ensure_schema()
    serve_metrics(settings.metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ClickHouseSink(settings, store).run(stop)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks sit above the CLI (they start stacks): run them as their own process.
    if importlib.util.find_spec("bench") is None:
        # They live in the source tree, not in the installed package.
        raise ConfigError("the benchmarks run from a source checkout: `python -m bench` in its root")
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(sub, "topics", cmd_topics, "create the pipeline's topics (idempotent) and list them")
    add_command(sub, "sink", cmd_sink, "run the ClickHouse sink alone (for deployments with a ClickHouse server)")
    # Every option after `bench` belongs to `python -m bench` (main() passes the unparsed rest).
    add_command(
        sub,
        "bench",
        cmd_bench,
        "run the benchmarks from a source checkout (same as `python -m bench`; try `sluice bench --quick`)",
        add_help=False,
    )
