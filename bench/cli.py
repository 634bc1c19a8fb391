"""``python -m bench`` / ``sluice bench``: run the scenarios and print one table (or JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.harness import BenchEnv, ScenarioResult

__all__ = ["SCENARIOS", "build_parser", "main"]

logger = logging.getLogger(__name__)

Scenario = Callable[[BenchEnv, bool], ScenarioResult | list[ScenarioResult]]


def _scenarios() -> dict[str, Scenario]:
    import importlib

    modules = {
        "p1": ("bench.p1_processor", "run_p1"),
        "p1s": ("bench.p1_processor", "run_p1s"),
        "p2": ("bench.p2_engine", "run_p2_p3"),
        "p4": ("bench.p4_priority", "run_p4"),
        "p4b": ("bench.p4_priority", "run_p4_burst"),
        "p5": ("bench.p5_latency", "run_p5"),
        "p6": ("bench.p6_memory", "run_p6"),
        "p7": ("bench.p7_failover", "run_p7"),
        "p8": ("bench.p8_ingest", "run_p8"),
        "p9": ("bench.p9_semantic", "run_p9"),
        "p10": ("bench.p10_scheduling", "run_p10"),
        "p11": ("bench.p10_scheduling", "run_p11"),
        "p12": ("bench.p12_flex", "run_p12"),
        "p13": ("bench.p13_recovery", "run_p13"),
    }
    return {key: getattr(importlib.import_module(module), fn) for key, (module, fn) in modules.items()}


SCENARIOS = ("p1", "p1s", "p2", "p3", "p4", "p4b", "p5", "p6", "p7", "p8", "p9", "p10", "p11", "p12", "p13")


def _table(results: list[ScenarioResult], console: Console) -> None:
    table = Table(title="Sluice benchmarks (each ratio measured side by side in this run)")
    for col in ("scenario", "measured", "ratio", "target", "result"):
        table.add_column(col, overflow="fold")
    for r in results:
        verdict = "[green]pass[/]" if r.passed else "[red]miss[/]"
        table.add_row(f"{r.scenario} {r.title}", r.summary(), f"{r.ratio:.3g}", r.target, verdict)
    console.print(table)
    for r in results:
        if r.notes:
            console.print(f"[dim]{r.scenario}: {r.notes}[/]")


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Sluice benchmarks (ratios measured in one run)")
    p.add_argument("--quick", action="store_true", help="about a minute per scenario")
    p.add_argument(
        "--only", default=",".join(SCENARIOS), help="comma list of p1, p1s, p2..p13 (p2 and p3 run together)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here (compare between commits)")
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=None if sys.stdout.isatty() else 160)
    wanted = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    runners = _scenarios()
    todo = [k for k in runners if k in wanted or (k == "p2" and "p3" in wanted)]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    env = BenchEnv(work)
    results: list[ScenarioResult] = []
    started = time.monotonic()
    try:
        for key in todo:
            with console.status(f"running {key}{' (quick)' if args.quick else ''}…"):
                t0 = time.monotonic()
                out = runners[key](env, args.quick)
            for r in out if isinstance(out, list) else [out]:
                if r.scenario.lower() in wanted:
                    r.extra["seconds"] = round(time.monotonic() - t0, 1)
                    results.append(r)
                    console.print(f"[bold]{r.scenario}[/] {r.title}: {r.summary()} → ratio {r.ratio:.3g}")
    finally:
        env.close()
    _table(results, console)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "commit": _git_rev(),
                    "quick": args.quick,
                    "machine": {"platform": platform.platform(), "python": platform.python_version()},
                    "seconds": round(time.monotonic() - started, 1),
                    "results": [r.__dict__ for r in results],
                },
                indent=2,
                default=str,
            )
        )
        console.print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1
