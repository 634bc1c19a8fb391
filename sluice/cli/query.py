"""``sluice sql`` and ``sluice stats``: the analytics tables."""

from __future__ import annotations

import argparse

from sluice.cli.common import add_command, console, print_rows, settings_from

__all__ = ["register"]


def cmd_sql(args: argparse.Namespace) -> int:
    from analytics.query import open_query

    res = open_query(settings_from(args))(args.query, None)
    print_rows(res.columns, res.rows, args.format)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from analytics.query import open_query, savings_sql, stats_sql

    settings = settings_from(args)
    db = settings.clickhouse.database
    query = open_query(settings)
    params = {"tenant": args.tenant} if args.tenant else {}
    if args.view in ("latency", "all"):
        res = query(stats_sql(db, "r.tenant = {tenant:String}" if args.tenant else "1"), params)
        if args.format == "table":
            console.print("[bold]Latency and cost by model and priority[/]")
        print_rows(res.columns, res.rows, args.format)
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
    sp.add_argument("--format", choices=["table", "json"], default="table")
