"""P4: high-priority submit→result latency while a backlog of low-priority requests is queued,
against the same measurement on an idle pipeline. The instant test engine with a fixed time per
batch stands in for the GPU, so the broker and the consumer's scheduling are what is measured."""

from __future__ import annotations

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, percentile
from bench.p5_latency import steady_latencies
from producers import SluiceClient

__all__ = ["run_p4"]


def run_p4(env: BenchEnv, quick: bool) -> ScenarioResult:
    backlog, probes = (3_000, 40) if quick else (10_000, 200)
    settings = env.settings("p4", instant_catalog())
    settings.engine.kind = "instant"
    # A GPU-like batch time: the backlog drains at 160 requests/s, so the measurement is the
    # scheduling (and the broker), not 2 CPU cores saturated by draining results into ClickHouse.
    settings.engine.instant_batch_seconds = 0.2
    settings.engine.max_batch_size = 32
    settings.engine.batch_wait_ms = 20
    with env.stack(settings) as stack:
        topics = stack.topics
        results = Observer(stack.settings, [topics.results])
        routed_low = Observer(stack.settings, [topics.model("bench", "low")])
        client = SluiceClient(stack.settings)
        try:
            steady_latencies(client, results, 5, 5.0, "warm-up", priority="high")
            idle = steady_latencies(client, results, probes, 10.0, "idle", priority="high")
            low_ids = [
                client.submit(f"backlog {i}", priority="low", tenant="bench", max_tokens=8, cache=False)
                for i in range(backlog)
            ]
            client.flush()
            # Measure once the backlog sits on the model topic in front of the consumer (the
            # router has no priority across its input topics; see the README).
            routed_low.wait_for(backlog, timeout=600)
            busy = steady_latencies(client, results, probes, 10.0, "busy", priority="high")
            low_left = sum(1 for rid in low_ids if rid not in results.arrivals)
            results.wait_keys(low_ids, timeout=900)  # low priority still finishes
        finally:
            results.close()
            routed_low.close()
    idle_p95, busy_p95 = percentile(idle, 0.95), percentile(busy, 0.95)
    ratio = busy_p95 / idle_p95
    return ScenarioResult(
        "P4",
        "priority isolation",
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
    )
