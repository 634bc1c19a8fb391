"""P1: requests/s through the Faust processor (decode, validate, classify, dedupe, route; Avro in
and out) against a raw consume→produce passthrough on the same broker with the same input."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, produce_all
from schemas import ChatMessage, InferenceRequest, Serde
from sluice.settings import Settings
from sluice.topics import ensure_topics

__all__ = ["run_p1"]


def _requests(n: int, tag: str) -> list[tuple[bytes, bytes]]:
    serde = Serde()
    out = []
    for i in range(n):
        r = InferenceRequest(
            request_id=f"{tag}-{i}",
            tenant="bench",
            messages=[
                ChatMessage(role="user", content=f"Summarize ticket {tag}-{i}: the consumer lags after a deploy.")
            ],
            max_tokens=64,
        )
        out.append((r.request_id.encode(), serde.encode(r)))
    return out


def _measure(settings: Settings, in_topic: str, observer: Observer, n: int, tag: str) -> float:
    produce_all(settings, in_topic, _requests(1, f"{tag}-warm"))
    observer.wait_for(1, timeout=120)  # the processor is up and has routed a request
    batch = _requests(n, tag)
    t0 = time.perf_counter()
    produce_all(settings, in_topic, batch)
    t_end = observer.wait_for(n + 1, timeout=600)
    return n / (t_end - t0)


def _faust_rate(env: BenchEnv, name: str, n: int, lean: bool) -> float:
    settings = env.settings(name, instant_catalog())
    if lean:
        # The floor: one Faust hop, one output per request (no dedupe repartition, no status events).
        settings.publish_status = False
        settings.processor.dedupe_enabled = False
    with env.stack(settings, run_consumers=False, run_sink=False) as stack:
        observer = Observer(stack.settings, stack.topics.model_topics("bench"))
        try:
            return _measure(stack.settings, stack.topics.requests("normal"), observer, n, name)
        finally:
            observer.close()


def _passthrough_rate(env: BenchEnv, n: int) -> float:
    settings = env.settings("p1-raw", instant_catalog())
    with env.stack(settings, run_processor=False, run_consumers=False, run_sink=False) as stack:
        p_in, p_out = f"{settings.topic_prefix}passthrough.in", f"{settings.topic_prefix}passthrough.out"
        ensure_topics(stack.settings.kafka, {p_in: {}, p_out: {}})
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.passthrough", stack.bootstrap_servers, p_in, p_out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        observer = Observer(stack.settings, [p_out])
        try:
            return _measure(stack.settings, p_in, observer, n, "raw")
        finally:
            observer.close()
            proc.terminate()
            proc.wait(30)


def run_p1(env: BenchEnv, quick: bool) -> ScenarioResult:
    n = 5_000 if quick else 50_000
    faust_rate = _faust_rate(env, "p1", n, lean=False)
    lean_rate = _faust_rate(env, "p1-lean", n, lean=True)
    raw_rate = _passthrough_rate(env, n)
    ratio = faust_rate / raw_rate
    return ScenarioResult(
        "P1",
        "processor throughput",
        {"requests": n, "faust_req_s": faust_rate, "faust_lean_req_s": lean_rate, "passthrough_req_s": raw_rate},
        ratio,
        ">= 0.5x passthrough and >= 10k req/s",
        ratio >= 0.5 and faust_rate >= 10_000,
        notes="faust_lean = dedupe and status events off (one hop, one output per request)",
    )
