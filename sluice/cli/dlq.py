"""``sluice dlq list|show|replay``: the dead-letter workflow."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from sluice.cli.common import console, print_rows, settings_from

if TYPE_CHECKING:
    from analytics.dlq import DlqFilter

__all__ = ["register"]


def _filter(args: argparse.Namespace) -> DlqFilter:
    from analytics.dlq import DlqFilter, parse_age

    return DlqFilter(
        reason=args.reason,
        model=args.model,
        tenant=args.tenant,
        since=parse_age(args.since) if args.since else None,
        ids=list(args.id or []),
        batch_id=args.batch,
    )


def cmd_list(args: argparse.Namespace) -> int:
    from analytics.dlq import list_dead_letters
    from analytics.query import open_query

    settings = settings_from(args)
    where = _filter(args)
    rows = list_dead_letters(open_query(settings), where, settings.clickhouse.database, args.limit)
    columns = ["dead_letter_id", "created_at", "reason", "stage", "request_id", "tenant", "model", "attempt", "error"]
    print_rows(columns, [[r[c] for c in columns] for r in rows], args.format)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from analytics.dlq import show_dead_letter
    from analytics.query import open_query
    from core import clients

    settings = settings_from(args)
    row = show_dead_letter(
        open_query(settings), args.dead_letter_id, clients.serde(settings), settings.clickhouse.database
    )
    if row is None:
        console.print(f"no dead letter {args.dead_letter_id}")
        return 1
    print(json.dumps(row, default=str, indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from analytics.dlq import replay
    from analytics.query import open_query
    from core import clients
    from producers import SluiceClient

    settings = settings_from(args)
    where = _filter(args)
    with SluiceClient(settings) as client:
        outcomes = replay(
            open_query(settings),
            client,
            clients.serde(settings),
            where,
            to_model=args.to_model,
            dry_run=args.dry_run,
            limit=args.limit,
            database=settings.clickhouse.database,
        )
    columns = ["dead_letter_id", "action", "request_id", "detail"]
    print_rows(columns, [[o.dead_letter_id, o.action, o.request_id, o.detail] for o in outcomes], args.format)
    if args.format == "table":
        replayed = sum(o.action == "replayed" for o in outcomes)
        console.print(f"{replayed} replayed, {len(outcomes) - replayed} not")
    return 0


def _add_filters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--reason", default=None, help="e.g. engine_error, unknown_model, retries_exhausted")
    sp.add_argument("--model", default=None)
    sp.add_argument("--tenant", default=None)
    sp.add_argument("--since", default=None, help="only dead letters younger than this: 30m, 2h, 7d")
    sp.add_argument("--id", action="append", help="a dead letter id (repeatable)")
    sp.add_argument("--batch", default=None, help="only the failed requests of this batch")
    sp.add_argument("--limit", type=int, default=1000)
    sp.add_argument("--format", choices=["table", "json"], default="table")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="list, show and replay dead letters", description="the dead-letter workflow")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    sp = dlq_sub.add_parser("list", help="dead letters matching the filters")
    _add_filters(sp)
    sp.set_defaults(fn=cmd_list)
    sp = dlq_sub.add_parser("show", help="one dead letter, with its original request decoded")
    sp.add_argument("dead_letter_id")
    sp.set_defaults(fn=cmd_show)
    sp = dlq_sub.add_parser("replay", help="publish the original requests again (idempotent; keeps replay_of)")
    _add_filters(sp)
    sp.add_argument("--to-model", default=None, help="send the replays to this model")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(fn=cmd_replay)
