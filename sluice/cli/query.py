"""``sluice sql`` and ``sluice stats``: the analytics tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sluice.cli.common import add_command, console, print_rows, settings_from

__all__ = ["register"]


def cmd_sql(args: argparse.Namespace) -> int:
    from analytics.query import open_query

    res = open_query(settings_from(args))(args.query, None)
    print_rows(res.columns, res.rows, args.format)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from analytics.query import open_query
    from analytics.rollup import complete_up_to_sql
    from analytics.rollup import live_savings_sql as savings_sql
    from analytics.rollup import live_stats_sql as stats_sql

    settings = settings_from(args)
    db = settings.clickhouse.database
    query = open_query(settings)
    params = {"tenant": args.tenant} if args.tenant else {}
    # The hourly rollup the sink keeps (refreshed every SLUICE_CLICKHOUSE__ROLLUP_INTERVAL_S), with
    # the hours it has not caught up on read from the raw tables: complete up to now.
    ((complete, rollup_at),) = query(complete_up_to_sql(db), None).rows
    if args.format == "table":
        console.print(
            f"[dim]complete up to {complete} UTC (every result stored by then; hourly rollup refreshed "
            f"{rollup_at or 'never'}, newer hours read live)[/]"
        )
    else:
        print(json.dumps({"complete_up_to": str(complete), "rollup_refreshed_at": str(rollup_at)}), file=sys.stderr)
    if args.view in ("latency", "all"):
        res = query(stats_sql(db, "tenant = {tenant:String}" if args.tenant else "1"), params)
        if args.format == "table":
            console.print("[bold]Latency and cost by model and priority[/]")
        print_rows(res.columns, res.rows, args.format)
    if args.plot is not None:
        from datetime import UTC, datetime

        from analytics.report import report_html, report_sql

        res = query(report_sql(db, "tenant = {tenant:String}" if args.tenant else "1"), params)
        args.plot.write_text(report_html(res.columns, res.rows, generated=datetime.now(UTC)))
        console.print(f"wrote {args.plot}")
    if args.view in ("savings", "all"):
        res = query(savings_sql(db, "tenant = {tenant:String}" if args.tenant else "1"), params)
        if args.format == "table":
            console.print("[bold]Savings against running everything on the most capable model[/]")
        print_rows(res.columns, res.rows, args.format)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(sub, "sql", cmd_sql, "run SQL on the analytics tables (database `sluice`)")
    sp.add_argument("query")
    sp.add_argument("--format", choices=["table", "json"], default="table")

    sp = add_command(sub, "stats", cmd_stats, "latency and cost by model and priority; savings by tenant")
    sp.add_argument("--tenant", default=None)
    sp.add_argument("--view", choices=["all", "latency", "savings"], default="all")
    sp.add_argument(
        "--plot", type=Path, default=None, metavar="HTML", help="also write cost and latency charts by hour here"
    )
    sp.add_argument("--format", choices=["table", "json"], default="table")
