"""P1: requests/s through the Faust processor (decode, validate, classify, dedupe, route; Avro in
and out) against a raw consume→produce passthrough on the same broker with the same input.

With the semantic cache, P1 runs the processor twice more on one workload, cache off and on: an
index warmed with n/10 answered tickets (the bench answers them on the results topic, as a GPU
consumer would), then the measured tickets, one in ten a reworded request about a warm ticket.
Off, every request reaches a model topic; on, the rewordings are answered from the index. Both
count requests routed or answered."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, kafka_unavailable, produce_all
from core.placement import dedupe_key, placement_key
from core.settings import ProcessorSettings, Settings
from core.topics import ensure_topics
from schemas import ChatMessage, InferenceRequest, InferenceResult, ResultStatus, Serde, utcnow

__all__ = ["run_p1", "run_p1s"]


_TICKET = "Summarize ticket {}: the consumer lags after a deploy."
_REWORDED = "Give a one-line summary of ticket {}: the consumer lags after a deploy."


def _request(rid: str, text: str) -> InferenceRequest:
    return InferenceRequest(
        request_id=rid, tenant="bench", messages=[ChatMessage(role="user", content=text)], max_tokens=64
    )


def _requests(n: int, tag: str, reworded_every: int = 0, keyed: bool = True) -> list[tuple[bytes, bytes]]:
    """Encoded requests, keyed as Sluice's producers key them (by dedupe key: each lands on its
    table partition) or, ``keyed=False``, by request id as a foreign producer might (most then
    take the router's repartition hop)."""
    serde = Serde()
    ps = ProcessorSettings()
    out = []
    for i in range(n):
        text = _TICKET.format(f"{tag}-{i}")
        if reworded_every and i % reworded_every == 0:
            # Each warm ticket is reworded once: a repeat of the same rewording would be an
            # exact duplicate (attached to its first copy, not a semantic lookup).
            text = _REWORDED.format(f"warm-{i // reworded_every}")
        r = _request(f"{tag}-{i}", text)
        key = placement_key(r, ps) if keyed else r.request_id
        out.append((key.encode(), serde.encode(r)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes so far, every thread (librdkafka's included), in nanoseconds
    from ``/proc/PID/task/*/schedstat``: ``/proc/PID/stat`` counts in 10 ms ticks, too coarse for
    a passthrough that spends a few microseconds per message."""
    total_ns = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total_ns += int(f.read().split()[0])
            except FileNotFoundError:
                continue  # a thread that ended between listing and reading
    return total_ns / 1e9


@dataclass
class Rate:
    req_s: float
    cpu_s_per_1k: float  # CPU seconds of the measured processes per 1,000 requests


def _measure(
    settings: Settings, in_topic: str, observer: Observer, n: int, tag: str, pids: list[int], keyed: bool = True
) -> Rate:
    """Requests/s from the first produce to the last output, and the CPU ``pids`` used meanwhile."""
    base = observer.count
    produce_all(settings, in_topic, _requests(1, f"{tag}-warm"))
    observer.wait_for(base + 1, timeout=120)  # the processor is up and has routed a request
    batch = _requests(n, tag, keyed=keyed)
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    produce_all(settings, in_topic, batch)
    t_end = observer.wait_for(base + 1 + n, timeout=600)
    cpu = cpu_seconds(pids) - cpu0
    return Rate(n / (t_end - t0), cpu / n * 1000)


def _faust_rate(
    env: BenchEnv,
    name: str,
    n: int,
    lean: bool,
    broker: str = "tansu",
    routers: int = 1,
    partitions: int | None = None,
    keyed: bool = True,
) -> Rate:
    settings = env.settings(name, instant_catalog())
    if lean:
        # The floor: one Faust hop, one output per request (no dedupe repartition, no status events).
        settings = settings.evolve(publish_status=False, processor={"dedupe_enabled": False})
    if partitions is not None:
        settings = settings.evolve(kafka={"partitions": partitions})
    with env.stack(settings, run_consumers=False, run_sink=False, broker=broker, routers=routers) as stack:
        workers = [c for c in stack.children if c.name.startswith("processor")]
        observer = Observer(stack.settings, stack.topics.model_topics("bench"))
        try:
            if routers > 1:
                # Every worker holds partitions before the clock starts (no rebalance mid-run).
                _until_all_route(stack.settings, stack.topics.requests("normal"), observer, workers, stack)
            pids = [c.popen.pid for c in workers]
            return _measure(stack.settings, stack.topics.requests("normal"), observer, n, name, pids, keyed=keyed)
        finally:
            observer.close()


def _routed(url: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "sluice_routed_requests_total"
    )


def _until_all_route(settings: Settings, topic: str, observer: Observer, workers: list[Any], stack: Any) -> None:
    sent = 0
    deadline = time.monotonic() + 120
    while not all(_routed(stack.metrics_urls[w.name]) > 0 for w in workers):
        if time.monotonic() > deadline:
            raise TimeoutError("not every router worker routed within 120 s")
        produce_all(settings, topic, _requests(20, f"join-{sent}"))
        sent += 20
        time.sleep(1.0)
    observer.wait_for(sent, timeout=120)


def _indexed_entries(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "sluice_semantic_cache_entries"
    )


def _warm_index(settings: Settings, in_topic: str, results_topic: str, warm_n: int, router_metrics: str) -> None:
    """Route ``warm_n`` tickets, then publish their results as a GPU consumer would, and wait
    until the router has processed them (with the cache on, they become index entries)."""
    serde = Serde()
    warm = [_request(f"warm-{i}", _TICKET.format(f"warm-{i}")) for i in range(warm_n)]
    routed = Observer(settings, [results_topic, *_model_topics(settings)])
    try:
        produce_all(settings, in_topic, [(r.request_id.encode(), serde.encode(r)) for r in warm])
        routed.wait_for(warm_n, timeout=300)
        now = utcnow()
        answers = [
            InferenceResult(
                request_id=r.request_id,
                tenant=r.tenant,
                priority=r.priority,
                model="bench",
                status=ResultStatus.SUCCEEDED,
                output_text="The consumer group rebalances after every deploy.",
                finish_reason="stop",
                prompt_tokens=16,
                completion_tokens=9,
                created_at=r.created_at,
                started_at=now,
                completed_at=now,
                engine_run_id="bench-warm",
                dedupe_key=dedupe_key(r, settings.processor),
            )
            for r in warm
        ]
        produce_all(settings, results_topic, [(a.request_id.encode(), serde.encode(a)) for a in answers])
        if settings.processor.semantic.enabled:
            # Each answered ticket becomes an entry once the router has embedded it.
            deadline = time.monotonic() + 300
            while _indexed_entries(router_metrics) < warm_n:
                if time.monotonic() > deadline:
                    raise TimeoutError("the semantic index did not fill")
                time.sleep(0.5)
        time.sleep(2.0)
    finally:
        routed.close()


def _model_topics(settings: Settings) -> list[str]:
    from core.topics import Topics

    return Topics(settings.topic_prefix).model_topics("bench")


def _semantic_rate(env: BenchEnv, name: str, n: int, semantic: bool, reworded_every: int = 10) -> tuple[float, int]:
    """Requests/s routed or answered, and how many were answered from the semantic cache."""
    settings = env.settings(name, instant_catalog(), processor={"semantic": {"enabled": semantic}})
    with env.stack(settings, run_consumers=False, run_sink=False) as stack:
        in_topic = stack.topics.requests("normal")
        router_metrics = stack.metrics_urls["processor"]
        _warm_index(stack.settings, in_topic, stack.topics.results, n // 10, router_metrics)
        observer = Observer(stack.settings, [stack.topics.results, *stack.topics.model_topics("bench")])
        prefix = f"{name}-"
        try:
            batch = _requests(n, name, reworded_every=reworded_every)
            t0 = time.perf_counter()
            produce_all(stack.settings, in_topic, batch)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with observer._lock:
                    mine = [k for k in observer.arrivals if k.startswith(prefix)]
                    if len(mine) >= n:
                        t_end = max(observer.arrivals[k] for k in mine)
                        hits = sum(1 for k in mine if observer.partitions[k][0] == stack.topics.results)
                        return n / (t_end - t0), hits
                time.sleep(0.05)
            raise TimeoutError(f"{name}: not every request was routed or answered")
        finally:
            observer.close()


def _passthrough_rate(env: BenchEnv, n: int, broker: str = "tansu") -> Rate:
    settings = env.settings(f"p1-raw-{broker}", instant_catalog())
    with env.stack(settings, run_processor=False, run_consumers=False, run_sink=False, broker=broker) as stack:
        p_in, p_out = f"{settings.topic_prefix}passthrough.in", f"{settings.topic_prefix}passthrough.out"
        ensure_topics(stack.settings.kafka, {p_in: {}, p_out: {}})
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.passthrough", stack.bootstrap_servers, p_in, p_out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        observer = Observer(stack.settings, [p_out])
        try:
            return _measure(stack.settings, p_in, observer, n, "raw", [proc.pid])
        finally:
            observer.close()
            proc.terminate()
            proc.wait(30)


def run_p1s(env: BenchEnv, quick: bool) -> ScenarioResult:
    n = 5_000 if quick else 50_000
    # Interleaved rounds, medians: one run of each varies by a third on a small shared host.
    rounds = 3
    off, on, none, hits = [], [], [], []
    for r in range(rounds):
        off.append(_semantic_rate(env, f"p1-sem-off{r}", n, semantic=False)[0])
        rate, h = _semantic_rate(env, f"p1-sem-on{r}", n, semantic=True)
        on.append(rate)
        hits.append(h)
        # The same processor with no reworded requests: what the lookup itself costs.
        none.append(_semantic_rate(env, f"p1-sem-none{r}", n, semantic=True, reworded_every=0)[0])
    off_rate, on_rate, no_hits_rate = statistics.median(off), statistics.median(on), statistics.median(none)
    return ScenarioResult(
        "P1s",
        "processor throughput, semantic cache on/off",
        {
            "requests": n,
            "cache_off_req_s": off_rate,
            "cache_on_req_s": on_rate,
            "semantic_hits": statistics.median(hits),
            "cache_on_no_rewording_req_s": no_hits_rate,
        },
        no_hits_rate / off_rate,
        ">= 0.8x with the cache off (P1's workload: no rewordings)",
        no_hits_rate / off_rate >= 0.8,
        notes=(
            f"medians of {rounds} interleaved rounds (off {[round(x) for x in off]}, on {[round(x) for x in on]}, "
            f"no rewording {[round(x) for x in none]}); warm index of requests/10 answered tickets; "
            f"cache_on: 1 in 10 requests reworded (hits); ratio: no rewording / off"
        ),
    )


def run_p1(env: BenchEnv, quick: bool) -> ScenarioResult:
    """Every default feature on; CPU from /proc of the router worker(s) and of the passthrough."""
    n = 5_000 if quick else 50_000
    brokers = ["tansu"]
    why_not = kafka_unavailable()
    if why_not is None:
        brokers.append("kafka")  # the same workload on Apache Kafka (one local node), in this run
    measured: dict[str, float] = {"requests": n}
    for broker in brokers:
        tag = "" if broker == "tansu" else "kafka_"
        one = _faust_rate(env, f"p1-{broker}", n, lean=False, broker=broker)
        two = _faust_rate(env, f"p1-{broker}-2w", n, lean=False, broker=broker, routers=2, partitions=4)
        # Before co-partitioning: keyed by request id, as every request was until now.
        hop = _faust_rate(env, f"p1-{broker}-hop", n, lean=False, broker=broker, keyed=False)
        raw = _passthrough_rate(env, n, broker=broker)
        measured.update(
            {
                f"{tag}faust_req_s": one.req_s,
                f"{tag}faust_cpu_s_per_1k": one.cpu_s_per_1k,
                f"{tag}faust_2_workers_req_s": two.req_s,
                f"{tag}faust_2_workers_cpu_s_per_1k": two.cpu_s_per_1k,
                f"{tag}faust_foreign_keys_req_s": hop.req_s,
                f"{tag}faust_foreign_keys_cpu_s_per_1k": hop.cpu_s_per_1k,
                f"{tag}passthrough_req_s": raw.req_s,
                f"{tag}passthrough_cpu_s_per_1k": raw.cpu_s_per_1k,
                f"{tag}cpu_ratio": one.cpu_s_per_1k / raw.cpu_s_per_1k,
                f"{tag}throughput_ratio": one.req_s / raw.req_s,
            }
        )
    lean = _faust_rate(env, "p1-lean", n, lean=True)
    measured["faust_lean_req_s"] = lean.req_s
    cpu_ratio, throughput_ratio = measured["cpu_ratio"], measured["throughput_ratio"]
    notes = (
        "cpu_s_per_1k: CPU seconds (every thread, /proc schedstat) of every router worker / of the passthrough per "
        "1,000 requests; requests keyed as Sluice's producers key them (dedupe on arrival); foreign_keys: "
        "keyed by request id (the repartition hop, as before); 2_workers: two router workers on 4 partitions; "
        "faust_lean = dedupe and status events off; tansu in memory"
    )
    notes += "; kafka_* = the same on Apache Kafka" if why_not is None else f"; Apache Kafka not measured: {why_not}"
    return ScenarioResult(
        "P1",
        "router CPU per request and throughput",
        measured,
        cpu_ratio,
        "CPU/request <= 5x passthrough, throughput >= 0.3x (one worker)",
        cpu_ratio <= 5 and throughput_ratio >= 0.3,
        notes=notes,
    )
