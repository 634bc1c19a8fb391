"""P4: high-priority submit→result latency while the real engine is saturated by a low-priority
backlog, against the same measurement on an idle pipeline.

Both sides run on the real vLLM engine at default settings (the tiny model in quick mode,
SmolLM2 otherwise). The backlog is large enough that the engine stays full of low-priority
requests for the whole measurement; the probes are short high-priority requests at a steady rate.

P4 burst: the backlog arrives as one burst of equal-length requests (a batch file), so every
engine slot fills at once and no slot frees for the whole length of a request; probes follow right
after. Run once per ``consumer.room`` policy (queue: the engine's waiting queue only; reserve:
slots kept for high priority; preempt: a low request aborted and re-queued), each beside its
idle probes and the burst's output tokens/s (what the policy costs in throughput).
"""

from __future__ import annotations

import time
from typing import Any

from bench.harness import BenchEnv, Observer, ScenarioResult, percentile
from bench.p2_engine import PROMPTS, mixed_workload
from bench.p5_latency import steady_latencies
from core.catalog import Catalog
from producers import SluiceClient

__all__ = ["ROOM_POLICIES", "run_p4", "run_p4_burst"]

ROOM_POLICIES = ("preempt", "reserve", "queue")


def run_p4(env: BenchEnv, quick: bool) -> ScenarioResult:
    backlog, probes, probe_tokens = (1_500, 20, 16) if quick else (1_000, 20, 16)
    entry, _ = env.engine_model(quick)
    name = entry.name
    settings = env.settings("p4", Catalog(models=[entry]), engine={"kind": "vllm"})
    with env.stack(settings) as stack:
        results = Observer(stack.settings, [stack.topics.results])
        client = SluiceClient(stack.settings)
        probe: dict[str, Any] = {"priority": "high", "max_tokens": probe_tokens}
        try:
            steady_latencies(client, results, 3, 1.0, "warm-up", timeout=600.0, **probe)  # vLLM loaded
            idle = steady_latencies(client, results, probes, 2.0, "idle", **probe)
            low_ids = [
                client.submit(
                    f"{PROMPTS[i % len(PROMPTS)]} backlog {i}",
                    priority="low",
                    tenant="bench",
                    max_tokens=n,
                    cache=False,
                )
                for i, (_, n) in enumerate(mixed_workload(backlog, seed=11, low=64, high=256))
            ]
            client.flush()
            # Measure once the engine is full of low-priority work.
            results.wait_for(results.count + 5, timeout=600)
            busy = steady_latencies(client, results, probes, 2.0, "busy", **probe)
            low_left = sum(1 for rid in low_ids if rid not in results.arrivals)
        finally:
            results.close()
    idle_p95, busy_p95 = percentile(idle, 0.95), percentile(busy, 0.95)
    ratio = busy_p95 / idle_p95
    return ScenarioResult(
        "P4",
        f"priority isolation, real engine ({name})",
        {
            "low_backlog": backlog,
            "idle_p50_ms": percentile(idle, 0.5),
            "idle_p95_ms": idle_p95,
            "busy_p50_ms": percentile(busy, 0.5),
            "busy_p95_ms": busy_p95,
            "low_waiting_after_probes": low_left,
        },
        ratio,
        "busy p95 <= 2x idle p95",
        ratio <= 2.0,
        notes="low_waiting_after_probes > 0 shows the engine was still saturated when the probes ended",
    )


def _burst(env: BenchEnv, quick: bool, room: str) -> dict[str, float]:
    # The burst must outlast the probes: the tiny model drains 96 x 192 tokens in about 3 s.
    burst, burst_tokens, probes, rate, probe_tokens = (384, 192, 20, 4.0, 16) if quick else (96, 192, 20, 1.0, 16)
    entry, _ = env.engine_model(quick)
    settings = env.settings(f"p4b-{room}", Catalog(models=[entry]), engine={"kind": "vllm"}, consumer={"room": room})
    with env.stack(settings) as stack:
        results = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        probe: dict[str, Any] = {"priority": "high", "max_tokens": probe_tokens}
        try:
            steady_latencies(client, results, 3, 1.0, "warm-up", timeout=600.0, **probe)  # vLLM loaded
            idle = steady_latencies(client, results, probes, rate, "idle", **probe)
            t0 = time.perf_counter()
            low_ids = [
                client.submit(
                    f"{PROMPTS[i % len(PROMPTS)]} burst {i}",
                    priority="low",
                    tenant="bench",
                    max_tokens=burst_tokens,
                    cache=False,
                )
                for i in range(burst)
            ]
            client.flush()
            time.sleep(1.0)  # fetched and in the engine: every slot taken by the burst
            busy = steady_latencies(client, results, probes, rate, "busy", **probe)
            low_left = sum(1 for rid in low_ids if rid not in results.arrivals)
            results.wait_keys(low_ids, timeout=1800)
            elapsed = max(results.arrivals[rid] for rid in low_ids) - t0
            tokens = sum(results.results[rid].completion_tokens for rid in low_ids)
        finally:
            results.close()
    return {
        "idle_p95_ms": percentile(idle, 0.95),
        "busy_p50_ms": percentile(busy, 0.5),
        "busy_p95_ms": percentile(busy, 0.95),
        "busy_max_ms": max(busy),
        "burst_tokens_per_s": tokens / elapsed,
        "low_waiting_after_probes": low_left,
    }


def run_p4_burst(env: BenchEnv, quick: bool) -> ScenarioResult:
    from core.settings import ConsumerSettings

    chosen = ConsumerSettings().room
    rows = {room: _burst(env, quick, room) for room in ROOM_POLICIES}
    measured: dict[str, float] = {}
    for room, row in rows.items():
        measured.update({f"{room}_{k}": v for k, v in row.items()})
        measured[f"{room}_ratio"] = row["busy_p95_ms"] / row["idle_p95_ms"]
    ratio = measured[f"{chosen}_ratio"]
    return ScenarioResult(
        "P4b",
        f"priority isolation after a burst, real engine ({env.engine_model(quick)[0].name}), room={chosen}",
        measured,
        ratio,
        "busy p95 <= 1.5x idle p95",
        ratio <= 1.5,
        notes="burst_tokens_per_s: the burst's output tokens/s from its submission to its last result, "
        "probes included (the policy's cost in throughput); low_waiting_after_probes > 0: the burst "
        "still filled the engine when the probes ended",
    )
