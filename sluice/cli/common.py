"""What every command group shares: the console, settings from the global options, table output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from core.settings import Settings

__all__ = ["Command", "add_command", "console", "print_rows", "settings_from"]

# Piped output (CI logs, `| tee`) would otherwise be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)

Command = Callable[[argparse.Namespace], int]


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if getattr(args, "bootstrap_servers", None):
        settings = settings.evolve(kafka={"bootstrap_servers": args.bootstrap_servers})
    return settings


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, fn: Command, help: str, **kw: object
) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help, description=help, **kw)  # type: ignore[arg-type]
    sp.set_defaults(fn=fn)
    return sp


def print_rows(columns: list[str], rows: list[list[object]], fmt: str) -> None:
    if fmt == "json":
        for r in rows:
            print(json.dumps(dict(zip(columns, r, strict=True)), default=str))
        return
    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(v) for v in r])
    console.print(table)
