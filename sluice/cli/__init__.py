"""The ``sluice`` command line: the composition root (nothing imports it). Thin argparse wrappers
over the packages, one module per command group; heavy imports are lazy."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from core.errors import SluiceError
from core.logs import setup_logging
from schemas.errors import validation_summary
from sluice.cli import admin, batch, dlq, query, requests, run

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_GROUPS = (run, requests, batch, query, dlq, admin)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Asynchronous LLM inference on Kafka.")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: SLUICE_LOG_LEVEL or WARNING)")
    p.add_argument("--bootstrap-servers", default=None, help="override SLUICE_KAFKA__BOOTSTRAP_SERVERS")
    sub = p.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.register(sub)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    level = (args.log_level or "WARNING").upper()
    setup_logging(level)
    try:
        code = args.fn(args)
    except (SluiceError, ValidationError, ValueError) as exc:
        # Invalid input is one clear line on stderr; the traceback only when debugging.
        if level == "DEBUG":
            logger.exception("sluice %s failed", args.command)
        message = validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"sluice {args.command}: error: {message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
