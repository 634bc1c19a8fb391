"""Smoke test only: the benchmark harness starts, measures and prints its table. No figure is
asserted here (benchmarks never gate the suite on speed); the quick P5 scenario is the cheapest
that goes through the whole pipeline. It runs as the README documents it, ``sluice bench --quick``
(options after ``bench`` belong to the benchmark runner)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def test_quick_bench_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sluice",
            "bench",
            "--quick",
            "--only",
            "p5",
            "--json",
            str(out),
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1 = a target missed, still a valid run
    assert "Sluice benchmarks" in proc.stdout and "P5 overhead latency" in proc.stdout
    data = json.loads(out.read_text())
    (p5,) = data["results"]
    assert p5["scenario"] == "P5" and p5["measured"]["requests"] == 300
    assert 0 < p5["measured"]["p50_ms"] <= p5["measured"]["p99_ms"]
    assert (proc.returncode == 0) == p5["passed"]
