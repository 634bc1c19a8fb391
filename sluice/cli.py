"""The ``sluice`` command line: thin wrappers over the packages (argparse; heavy imports lazy)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rich.console import Console

from sluice.errors import SluiceError
from sluice.logs import setup_logging
from sluice.settings import Settings

if TYPE_CHECKING:
    from sluice.dlq import DlqFilter

__all__ = ["main"]

logger = logging.getLogger(__name__)
# Piped output (CI logs, `| tee`) would otherwise be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if getattr(args, "bootstrap_servers", None):
        settings.kafka.bootstrap_servers = args.bootstrap_servers
    return settings


def cmd_demo(args: argparse.Namespace) -> int:
    from sluice.demo import run_demo

    return run_demo(_settings(args), console, max_tokens=args.max_tokens)


def cmd_up(args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack

    settings = _settings(args)
    if args.engine:
        settings.engine.kind = args.engine
    port = settings.kafka.bootstrap_servers.rpartition(":")[2]
    stack = LocalStack(
        settings,
        embedded_broker=not args.external_kafka,
        broker_port=int(port) if not args.external_kafka else None,
    )
    with console.status("starting the local stack…"):
        stack.start()
    console.print(
        f"[green]Sluice is up[/]: Kafka {stack.bootstrap_servers}, "
        f"ClickHouse {settings.clickhouse_url()}, "
        f"queries/metrics {stack.query_server.url if stack.query_server else '-'}; "
        f"logs in {stack.log_dir}. Ctrl-C stops."
    )
    try:
        stack.wait()
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from producers import SluiceClient

    with SluiceClient(_settings(args)) as client:
        rid = client.submit(
            args.prompt,
            priority=args.priority,
            model=args.model,
            tenant=args.tenant,
            max_tokens=args.max_tokens,
            idempotency_key=args.idempotency_key,
        )
    print(rid)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from schemas import InferenceResult
    from sluice.follow import follow_results, openai_batch_line

    stop = threading.Event()
    seen = 0

    def show(r: InferenceResult) -> None:
        nonlocal seen
        if args.format == "openai":
            print(openai_batch_line(r), flush=True)
        else:
            text = r.output_text if r.status == "succeeded" else r.error
            print(
                f"{r.request_id} {r.priority} {r.model} {r.status} {r.latency_ms}ms: {text}",
                flush=True,
            )
        seen += 1
        if not args.follow and args.limit and seen >= args.limit:
            stop.set()

    timer = None
    if not args.follow:
        timer = threading.Timer(args.timeout, stop.set)
        timer.start()
    try:
        follow_results(_settings(args), show, stop, group_id=args.group)
    except KeyboardInterrupt:
        pass
    finally:
        if timer:
            timer.cancel()
    return 0


def _print_result(columns: list[str], rows: list[list[object]], fmt: str) -> None:
    if fmt == "json":
        for r in rows:
            print(json.dumps(dict(zip(columns, r, strict=True)), default=str))
        return
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(v) for v in r])
    console.print(table)


def cmd_sql(args: argparse.Namespace) -> int:
    from sluice.analytics.query import open_query

    res = open_query(_settings(args))(args.query, None)
    _print_result(res.columns, res.rows, args.format)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sluice.analytics.query import open_query, savings_sql, stats_sql

    settings = _settings(args)
    db = settings.clickhouse.database
    query = open_query(settings)
    params = {"tenant": args.tenant} if args.tenant else {}
    if args.view in ("latency", "all"):
        res = query(stats_sql(db, "r.tenant = {tenant:String}" if args.tenant else "1"), params)
        if args.format == "table":
            console.print("[bold]Latency and cost by model and priority[/]")
        _print_result(res.columns, res.rows, args.format)
    if args.view in ("savings", "all"):
        res = query(savings_sql(db, "tenant = {tenant:String}" if args.tenant else "1"), params)
        if args.format == "table":
            console.print("[bold]Savings against running everything on the most capable model[/]")
        _print_result(res.columns, res.rows, args.format)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sluice.analytics.query import open_query, status_sql

    settings = _settings(args)
    res = open_query(settings)(status_sql(settings.clickhouse.database), {"request_id": args.request_id})
    if not res.rows:
        console.print(f"no status recorded for {args.request_id} (yet)")
        return 1
    if args.format == "table":
        state = res.rows[-1][0]
        console.print(f"{args.request_id}: [bold]{state}[/]")
    _print_result(res.columns, res.rows, args.format)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from producers import SluiceClient

    with SluiceClient(_settings(args)) as client:
        for rid in args.request_ids:
            client.cancel(rid, args.reason)
    console.print(
        f"cancellation requested for {len(args.request_ids)} request(s); `sluice status ID` shows the outcome"
    )
    return 0


def _dlq_filter(args: argparse.Namespace) -> DlqFilter:
    from sluice.dlq import DlqFilter, parse_age

    return DlqFilter(
        reason=args.reason,
        model=args.model,
        tenant=args.tenant,
        since=parse_age(args.since) if args.since else None,
        ids=list(args.id or []),
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from sluice.analytics.query import open_query
    from sluice.dlq import list_dead_letters

    settings = _settings(args)
    rows = list_dead_letters(open_query(settings), _dlq_filter(args), args.limit, settings.clickhouse.database)
    columns = ["dead_letter_id", "created_at", "reason", "stage", "request_id", "tenant", "model", "attempt", "error"]
    _print_result(columns, [[r[c] for c in columns] for r in rows], args.format)
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    from schemas import Serde
    from sluice.analytics.query import open_query
    from sluice.dlq import show_dead_letter

    settings = _settings(args)
    row = show_dead_letter(
        open_query(settings),
        args.dead_letter_id,
        Serde.from_settings(settings.schema_registry),
        settings.clickhouse.database,
    )
    if row is None:
        console.print(f"no dead letter {args.dead_letter_id}")
        return 1
    print(json.dumps(row, default=str, indent=2))
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from producers import SluiceClient
    from schemas import Serde
    from sluice.analytics.query import open_query
    from sluice.dlq import replay

    settings = _settings(args)
    with SluiceClient(settings) as client:
        outcomes = replay(
            open_query(settings),
            client,
            Serde.from_settings(settings.schema_registry),
            _dlq_filter(args),
            to_model=args.to_model,
            dry_run=args.dry_run,
            limit=args.limit,
            database=settings.clickhouse.database,
        )
    columns = ["dead_letter_id", "action", "request_id", "detail"]
    _print_result(columns, [[o.dead_letter_id, o.action, o.request_id, o.detail] for o in outcomes], args.format)
    if args.format == "table":
        replayed = sum(o.action == "replayed" for o in outcomes)
        console.print(f"{replayed} replayed, {len(outcomes) - replayed} not")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import main as bench_main

    return bench_main(args.bench_args)


def cmd_topics(args: argparse.Namespace) -> int:
    from sluice.catalog import load_catalog
    from sluice.topics import Topics, ensure_topics

    settings = _settings(args)
    topics = Topics(settings.topic_prefix).pipeline(
        load_catalog(settings.catalog_path), settings.processor.app_id, len(settings.retry.backoff_ms)
    )
    ensure_topics(settings.kafka, topics)
    for name in topics:
        print(name)
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    import signal

    from sluice.analytics.sink import ClickHouseSink
    from sluice.analytics.store import Store

    settings = _settings(args)
    ch = settings.clickhouse
    store = Store(settings.clickhouse_url(), ch.database, ch.username, ch.password)
    store.ensure_schema()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ClickHouseSink(settings, store).run(stop)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Asynchronous LLM inference on Kafka.")
    p.add_argument(
        "--log-level",
        default=None,
        help="DEBUG, INFO, WARNING (default: SLUICE_LOG_LEVEL or WARNING)",
    )
    p.add_argument("--bootstrap-servers", default=None, help="override SLUICE_KAFKA__BOOTSTRAP_SERVERS")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("demo", cmd_demo, "run the whole pipeline once on the embedded stack with a real model")
    sp.add_argument("--max-tokens", type=int, default=48)

    sp = add("up", cmd_up, "run the local stack in the foreground until Ctrl-C")
    sp.add_argument("--engine", choices=["vllm", "instant"], default=None)
    sp.add_argument(
        "--external-kafka",
        action="store_true",
        help="use SLUICE_KAFKA__BOOTSTRAP_SERVERS, start no broker",
    )

    sp = add("submit", cmd_submit, "publish one request; prints its request id")
    sp.add_argument("prompt")
    sp.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    sp.add_argument("--model", default=None)
    sp.add_argument("--tenant", default="default")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--idempotency-key", default=None)

    sp = add("results", cmd_results, "print results from the results topic")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing as results arrive")
    sp.add_argument("--group", default=None, help="consumer group to resume from (default: read all)")
    sp.add_argument("--format", choices=["text", "openai"], default="text", help="openai: Batch API JSONL")
    sp.add_argument("--limit", type=int, default=0)
    sp.add_argument("--timeout", type=float, default=10.0, help="without --follow, stop after this long")

    sp = add("bench", cmd_bench, "run the benchmarks (same as `python -m bench`; try `sluice bench --quick`)")
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for `python -m bench`")

    add("topics", cmd_topics, "create the pipeline's topics (idempotent) and list them")
    add("sink", cmd_sink, "run the ClickHouse sink alone (for deployments with a ClickHouse server)")

    sp = add("sql", cmd_sql, "run SQL on the analytics tables (database `sluice`)")
    sp.add_argument("query")
    sp.add_argument("--format", choices=["table", "json"], default="table")

    sp = add("stats", cmd_stats, "latency and cost by model and priority; savings by tenant")
    sp.add_argument("--tenant", default=None)
    sp.add_argument("--view", choices=["all", "latency", "savings"], default="all")
    sp.add_argument("--format", choices=["table", "json"], default="table")

    sp = add("cancel", cmd_cancel, "cancel requests that have not started (they get status `cancelled`)")
    sp.add_argument("request_ids", nargs="+")
    sp.add_argument("--reason", default="cancelled by the submitter")

    dlq = sub.add_parser("dlq", help="list, show and replay dead letters", description="the dead-letter workflow")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    def add_filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--reason", default=None, help="e.g. engine_error, unknown_model, retries_exhausted")
        sp.add_argument("--model", default=None)
        sp.add_argument("--tenant", default=None)
        sp.add_argument("--since", default=None, help="only dead letters younger than this: 30m, 2h, 7d")
        sp.add_argument("--id", action="append", help="a dead letter id (repeatable)")
        sp.add_argument("--limit", type=int, default=1000)
        sp.add_argument("--format", choices=["table", "json"], default="table")

    sp = dlq_sub.add_parser("list", help="dead letters matching the filters")
    add_filters(sp)
    sp.set_defaults(fn=cmd_dlq_list)
    sp = dlq_sub.add_parser("show", help="one dead letter, with its original request decoded")
    sp.add_argument("dead_letter_id")
    sp.set_defaults(fn=cmd_dlq_show)
    sp = dlq_sub.add_parser("replay", help="publish the original requests again (idempotent; keeps replay_of)")
    add_filters(sp)
    sp.add_argument("--to-model", default=None, help="send the replays to this model")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(fn=cmd_dlq_replay)

    sp = add("status", cmd_status, "a request's lifecycle (from the status topic, via ClickHouse)")
    sp.add_argument("request_id")
    sp.add_argument("--format", choices=["table", "json"], default="table")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level or "WARNING")
    try:
        code = args.fn(args)
    except SluiceError as exc:
        console.print(f"[red]error:[/] {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
