"""P6: a GPU consumer's peak RSS with a deep backlog against a shallow one (instant engine).

The backlog is written straight onto the model topic before the consumer starts, then the
consumer runs for a fixed time; its peak RSS (VmHWM) is read from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.harness import BenchEnv, ScenarioResult, instant_catalog, produce_all
from schemas import ChatMessage, InferenceRequest, Priority, Route, Serde
from sluice.local.stack import child_env

__all__ = ["run_p6"]


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def _consumer_peak(
    env: BenchEnv, backlog: int, seconds: float, *, durable: bool = False, broker: str = "tansu"
) -> float:
    settings = env.settings(
        f"p6-{broker}-{backlog}{'-durable' if durable else ''}",
        instant_catalog(),
        engine={"kind": "instant", "instant_token_seconds": 0.01},
    )
    with env.stack(
        settings, run_processor=False, run_consumers=False, run_sink=False, durable=durable, broker=broker
    ) as stack:
        serde = Serde()
        route = Route(model="bench", reason="bench")
        msgs = []
        for i in range(backlog):
            r = InferenceRequest(
                request_id=f"p6-{i}",
                tenant="bench",
                priority=Priority.LOW,
                messages=[ChatMessage(role="user", content=f"backlog item {i}: " + "lorem ipsum " * 20)],
                max_tokens=8,
                cache=False,
                route=route,
            )
            msgs.append((r.request_id.encode(), serde.encode(r)))
        produce_all(stack.settings, stack.topics.model("bench", "low"), msgs)
        del msgs
        log_path = stack.settings.data_dir / "p6-consumer.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_consumers", "--model", "bench"],
            env=child_env(stack.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            peak = 0.0
            end = time.monotonic() + seconds
            while time.monotonic() < end and proc.poll() is None:
                peak = max(peak, _peak_rss_mib(proc.pid))
                time.sleep(0.2)
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the consumer exited with {proc.returncode}:\n{tail}")
            return max(peak, _peak_rss_mib(proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def run_p6(env: BenchEnv, quick: bool) -> ScenarioResult:
    seconds = 15.0 if quick else 45.0
    small = _consumer_peak(env, 1_000, seconds)
    # A middle point shows whether memory follows backlog depth (it would keep growing) or
    # plateaus once the backlog exceeds what the consumer buffers and prefetches.
    middle = _consumer_peak(env, 10_000, seconds)
    large = _consumer_peak(env, 100_000, seconds)
    # The same consumer against the durable broker (`sluice up`'s default).
    durable_small = _consumer_peak(env, 1_000, seconds, durable=True)
    durable_large = _consumer_peak(env, 100_000, seconds, durable=True)
    ratio = large / small
    return ScenarioResult(
        "P6",
        "bounded consumer memory",
        {
            "peak_rss_1k_mib": small,
            "peak_rss_10k_mib": middle,
            "peak_rss_100k_mib": large,
            "durable_peak_rss_1k_mib": durable_small,
            "durable_peak_rss_100k_mib": durable_large,
            "seconds_each": seconds,
        },
        ratio,
        "<= 1.1x",
        ratio <= 1.1,
        notes=f"100k vs 10k: {large / middle:.3f}x; durable broker 100k vs 1k: {durable_large / durable_small:.3f}x",
    )
