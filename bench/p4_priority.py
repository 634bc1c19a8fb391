"""P4: high-priority submit→result latency while the real engine is saturated by a low-priority
backlog, against the same measurement on an idle pipeline.

Both sides run on the real vLLM engine at default settings (the tiny model in quick mode,
SmolLM2 otherwise). The backlog is large enough that the engine stays full of low-priority
requests for the whole measurement; the probes are short high-priority requests at a steady rate.
"""

from __future__ import annotations

from typing import Any

from bench.harness import BenchEnv, Observer, ScenarioResult, percentile
from bench.p2_engine import PROMPTS, mixed_workload
from bench.p5_latency import steady_latencies
from core.catalog import Catalog
from producers import SluiceClient

__all__ = ["run_p4"]


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
