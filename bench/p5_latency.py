"""P5: submit→result latency through the whole pipeline (router, dedupe, consumer, results topic)
with the instant test engine at a steady rate, so the pipeline's own overhead is what is measured.
The prompts are distinct, so the response cache is on (the default) without answering any."""

from __future__ import annotations

from typing import Any

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, kafka_unavailable, paced, percentile
from producers import SluiceClient

__all__ = ["run_p5", "steady_latencies"]


def steady_latencies(
    client: SluiceClient, observer: Observer, n: int, rate: float, tag: str, *, timeout: float = 300, **submit: Any
) -> list[float]:
    """Submit ``n`` requests at ``rate``/s (each flushed, as an online producer would); return
    the submit→result latency of each in milliseconds."""
    sent: dict[str, float] = {}
    for i, t in paced(n, rate):
        fields: dict[str, object] = {"tenant": "bench", "max_tokens": 8, "cache": False, **submit}
        rid = client.submit(f"{tag} request {i}", **fields)  # type: ignore[arg-type]
        client.flush(5)
        sent[rid] = t
    observer.wait_keys(list(sent), timeout=timeout)
    return [(observer.arrivals[rid] - t) * 1000 for rid, t in sent.items()]


def _latencies(env: BenchEnv, quick: bool, *, durable: bool, broker: str = "tansu") -> list[float]:
    n, rate = (300, 50.0) if quick else (3000, 100.0)
    settings = env.settings(
        f"p5-{broker}{'-durable' if durable else ''}", instant_catalog(), engine={"kind": "instant"}
    )
    with env.stack(settings, durable=durable, broker=broker) as stack:
        observer = Observer(stack.settings, [stack.topics.results])
        client = SluiceClient(stack.settings)
        try:
            steady_latencies(client, observer, 5, 5.0, "warm-up", timeout=120)  # the processor and consumer are up
            # Every default feature on: each (distinct) prompt passes the dedupe table on its way.
            return steady_latencies(client, observer, n, rate, "p5", cache=True)
        finally:
            observer.close()


def run_p5(env: BenchEnv, quick: bool) -> ScenarioResult:
    """The in-memory broker (the demo's) and the durable one (``sluice up``'s), one after the other."""
    n, rate = (300, 50.0) if quick else (3000, 100.0)
    lat = _latencies(env, quick, durable=False)
    durable = _latencies(env, quick, durable=True)
    p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
    d50, d99 = percentile(durable, 0.50), percentile(durable, 0.99)
    ratio = max(p50 / 50.0, p99 / 250.0)
    measured = {
        "requests": n,
        "rate_per_s": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "durable_p50_ms": d50,
        "durable_p99_ms": d99,
    }
    notes = f"tansu in memory (p50/p99); durable tansu (S3 storage): p50 {d50 / p50:.2f}x, p99 {d99 / p99:.2f}x"
    why_not = kafka_unavailable()
    if why_not is None:
        # Apache Kafka on local disk: what `sluice up` runs where Java is present.
        k = _latencies(env, quick, durable=True, broker="kafka")
        measured["kafka_p50_ms"], measured["kafka_p99_ms"] = percentile(k, 0.50), percentile(k, 0.99)
        notes += f"; Apache Kafka (local disk): p50 {measured['kafka_p50_ms'] / p50:.2f}x"
    else:
        notes += f"; Apache Kafka not measured: {why_not}"
    return ScenarioResult(
        "P5",
        "overhead latency",
        measured,
        ratio,
        "p50 <= 50 ms, p99 <= 250 ms (ratio = worst of p50/50, p99/250; <= 1)",
        p50 <= 50 and p99 <= 250,
        notes=notes,
    )
