"""P13: recovery of a durable ``sluice up`` after kill -9 of every process.

A real ``sluice up --broker B`` process (instant engine, so the model is not what is measured) is
given 2,000 acknowledged requests while its consumer is slowed down, so most are still queued;
then every process of the stack (its children first, then ``sluice up`` itself) gets SIGKILL at
once, as a host crash would. The figure is the time from starting ``sluice up`` again on the same
data directory until a result for every one of the 2,000 is on the results topic. Both durable
brokers side by side: tansu on SeaweedFS and Apache Kafka on local disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import BenchEnv, Observer, ScenarioResult
from core.catalog import Catalog, ModelEntry, write_catalog
from core.errors import SluiceError
from core.settings import Settings
from producers import SluiceClient
from sluice.local.kafka import java_binary, kafka_libs

__all__ = ["run_p13"]

TARGET_S = 30.0


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    frontier = [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in out]
        out.extend(frontier)
    return out


class _Up:
    def __init__(self, data_dir: Path, broker: str, token_seconds: float) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(
            models=[
                ModelEntry(
                    name="bench",
                    source="builtin:unused-by-instant-engine",
                    tier=1,
                    context_length=4096,
                    input_price_per_1m=0.02,
                    output_price_per_1m=0.04,
                )
            ]
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
            "SLUICE_DATA_DIR": str(data_dir),
            "SLUICE_CATALOG_PATH": str(write_catalog(catalog, data_dir / "catalog.toml")),
            "SLUICE_TOPIC_PREFIX": "p13.",
            "SLUICE_ENGINE__INSTANT_TOKEN_SECONDS": str(token_seconds),
        }
        self.cmd = [sys.executable, "-m", "sluice", "up", "--engine", "instant", "--broker", broker, "--no-gateway"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        (self.data_dir / "stack.json").unlink(missing_ok=True)
        log = (self.data_dir / "up.log").open("ab")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not (self.data_dir / "stack.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SluiceError(f"sluice up did not start; see {self.data_dir / 'up.log'}")
            time.sleep(0.05)

    def settings(self) -> Settings:
        info = json.loads((self.data_dir / "stack.json").read_text())
        s = Settings(data_dir=self.data_dir, topic_prefix="p13.")
        return s.evolve(kafka={"bootstrap_servers": info["bootstrap_servers"]})

    def kill_everything(self) -> None:
        assert self.proc is not None
        pids = [*_descendants(self.proc.pid), self.proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill_everything()


def _recovery(env: BenchEnv, broker: str, n: int) -> dict[str, float]:
    data = env.work_dir / f"p13-{broker}"
    # Slow while the backlog is queued (a consumer at ~0.05 s/token), then the same stack restarts.
    up = _Up(data, broker, token_seconds=0.05)
    up.start()
    try:
        with SluiceClient(up.settings()) as client:
            ids = [client.submit(f"p13 {broker} {i}", tenant="bench", max_tokens=8, cache=False) for i in range(n)]
        up.kill_everything()
        up.env["SLUICE_ENGINE__INSTANT_TOKEN_SECONDS"] = "0"
        t0 = time.perf_counter()
        up.start()
        settings = up.settings()
        results = Observer(settings, ["p13.results"])
        try:
            results.wait_keys(ids, timeout=900)
            done = max(results.arrivals[rid] for rid in ids)
            duplicates = sum(results.counts[rid] - 1 for rid in ids)
        finally:
            results.close()
        return {"seconds": done - t0, "duplicates": float(duplicates)}
    finally:
        up.stop()


def run_p13(env: BenchEnv, quick: bool) -> ScenarioResult:
    n = 2000
    tansu = _recovery(env, "tansu", n)
    measured = {"requests": float(n), "tansu_s": tansu["seconds"], "tansu_duplicates": tansu["duplicates"]}
    notes = ""
    try:
        java_binary()
        kafka_libs()
        kafka = _recovery(env, "kafka", n)
        measured |= {"kafka_s": kafka["seconds"], "kafka_duplicates": kafka["duplicates"]}
    except SluiceError as exc:
        notes = f"Apache Kafka not measured: {exc}"
    best = min(measured.get("kafka_s", float("inf")), measured["tansu_s"])
    return ScenarioResult(
        "P13",
        "recovery after kill -9 of a durable sluice up (2,000 queued)",
        measured,
        measured.get("kafka_s", measured["tansu_s"]) / TARGET_S,
        f"every request answered <= {TARGET_S:.0f} s after the restart (the durable default's broker)",
        best <= TARGET_S,
        notes,
    )
