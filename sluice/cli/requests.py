"""``sluice submit``, ``results``, ``cancel`` and ``status``: one request's life."""

from __future__ import annotations

import argparse
import threading

from schemas import InferenceResult, Priority, ResultStatus
from sluice.cli.common import add_command, console, print_rows, settings_from

__all__ = ["register"]


def cmd_submit(args: argparse.Namespace) -> int:
    from producers import SluiceClient

    with SluiceClient(settings_from(args)) as client:
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
    from analytics.results import follow_results, openai_batch_line

    stop = threading.Event()
    seen = 0

    def show(r: InferenceResult) -> None:
        nonlocal seen
        if args.format == "openai":
            print(openai_batch_line(r), flush=True)
        else:
            text = r.output_text if r.status is ResultStatus.SUCCEEDED else r.error
            print(f"{r.request_id} {r.priority} {r.model} {r.status} {r.latency_ms}ms: {text}", flush=True)
        seen += 1
        if not args.follow and args.limit and seen >= args.limit:
            stop.set()

    timer = None
    if not args.follow:
        timer = threading.Timer(args.timeout, stop.set)
        timer.start()
    try:
        follow_results(settings_from(args), show, stop, group_id=args.group)
    except KeyboardInterrupt:
        pass
    finally:
        if timer:
            timer.cancel()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from producers import SluiceClient

    with SluiceClient(settings_from(args)) as client:
        for rid in args.request_ids:
            client.cancel(rid, args.reason)
    console.print(
        f"cancellation requested for {len(args.request_ids)} request(s); `sluice status ID` shows the outcome"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from analytics.query import open_query, status_sql

    settings = settings_from(args)
    res = open_query(settings)(status_sql(settings.clickhouse.database), {"request_id": args.request_id})
    if not res.rows:
        console.print(f"no status recorded for {args.request_id} (yet)")
        return 1
    if args.format == "table":
        console.print(f"{args.request_id}: [bold]{res.rows[-1][0]}[/]")
    print_rows(res.columns, res.rows, args.format)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(sub, "submit", cmd_submit, "publish one request; prints its request id")
    sp.add_argument("prompt")
    sp.add_argument("--priority", choices=[p.value for p in Priority], default=Priority.NORMAL.value)
    sp.add_argument("--model", default=None)
    sp.add_argument("--tenant", default="default")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--idempotency-key", default=None)

    sp = add_command(sub, "results", cmd_results, "print results from the results topic")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing as results arrive")
    sp.add_argument("--group", default=None, help="consumer group to resume from (default: read all)")
    sp.add_argument("--format", choices=["text", "openai"], default="text", help="openai: Batch API JSONL")
    sp.add_argument("--limit", type=int, default=0)
    sp.add_argument("--timeout", type=float, default=10.0, help="without --follow, stop after this long")

    sp = add_command(sub, "cancel", cmd_cancel, "cancel requests that have not started (they get status `cancelled`)")
    sp.add_argument("request_ids", nargs="+")
    sp.add_argument("--reason", default="cancelled by the submitter")

    sp = add_command(sub, "status", cmd_status, "a request's lifecycle (from the status topic, via ClickHouse)")
    sp.add_argument("request_id")
    sp.add_argument("--format", choices=["table", "json"], default="table")
