"""P10 deadline attainment and P11 tenant fairness, each side by side with the order before them
(arrival order within a priority), on the instant engine with a per-token time at default
settings (256 requests in the engine, up to 8,192 read ahead per priority).

P10: the engine saturated by work without deadlines, then a burst, 30% of it with deadlines of
varied tightness; the share of *feasible* deadlines (at least the request's own generation time
away) met. Beside it the order before this release: arrival order and no escalation of requests
at risk.

P11: tenant A queues a backlog, then tenant B sends 50 requests at the same priority; B's p95
submit→result against B alone, and Jain's index of the tokens granted to A and B while both had
work waiting.
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from typing import Any

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, percentile
from core.settings import Settings
from producers import SluiceClient
from schemas import InferenceResult, ResultStatus, utcnow

__all__ = ["run_p10", "run_p11"]

TOKEN_S = 0.05  # simulated seconds per engine step


def _settings(env: BenchEnv, name: str, ordered: bool) -> Settings:
    """``ordered``: this release's order (deadlines, fair share, escalation of requests at risk);
    else the arrival order within a priority and no escalation, as before."""
    return env.settings(
        name,
        instant_catalog(),
        engine={"kind": "instant", "instant_token_seconds": TOKEN_S},
        consumer={"deadline_order": ordered, "fair_share": ordered},
        processor={"on_risk": "escalate" if ordered else "none"},
        publish_status=False,
    )


def _attainment(env: BenchEnv, n: int, ordered: bool) -> dict[str, float]:
    rng = random.Random(10)
    settings = _settings(env, f"p10-{'deadline' if ordered else 'arrival'}", ordered)
    with env.stack(settings, run_sink=False) as stack:
        observer = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        try:
            # The engine is saturated first (work without deadlines already queued and running, its
            # speed measured), then the mixed workload arrives.
            warm = [
                client.submit(f"p10 earlier work {i}", model="bench", max_tokens=rng.randint(16, 128), cache=False)
                for i in range(n // 2)
            ]
            client.flush()
            observer.wait_for(300, timeout=300)
            now = utcnow()
            wanted: dict[str, tuple[float, int]] = {}
            for i in range(n):
                tokens = rng.randint(16, 128)
                deadline = None
                if rng.random() < 0.3:
                    deadline = rng.uniform(5.0, 40.0)
                rid = client.submit(
                    f"p10 request {i}",
                    model="bench",
                    priority="low",
                    max_tokens=tokens,
                    tenant="bench",
                    cache=False,
                    deadline=None if deadline is None else now + timedelta(seconds=deadline),
                )
                if deadline is not None:
                    wanted[rid] = (deadline, tokens)
            client.flush()
            observer.wait_for(len(warm) + n, timeout=900)
            results = dict(observer.results)
        finally:
            observer.close()
            client.close()
    feasible = {rid: d for rid, (d, tokens) in wanted.items() if d >= tokens * TOKEN_S}
    met = sum(1 for rid in feasible if _met(results.get(rid)))
    return {"deadlines": len(wanted), "feasible": len(feasible), "met": met, "share": met / max(1, len(feasible))}


def _met(result: InferenceResult | None) -> bool:
    return result is not None and result.status is ResultStatus.SUCCEEDED


def run_p10(env: BenchEnv, quick: bool) -> ScenarioResult:
    n = 2_000 if quick else 4_000
    ordered = _attainment(env, n, ordered=True)
    fifo = _attainment(env, n, ordered=False)
    measured = {
        "requests": n,
        "with_deadline": ordered["deadlines"],
        "feasible": ordered["feasible"],
        "met_deadline_order": ordered["met"],
        "share_deadline_order": ordered["share"],
        "met_arrival_order": fifo["met"],
        "share_arrival_order": fifo["share"],
    }
    notes = (
        f"feasible deadlines met: {ordered['share']:.1%} in deadline order vs {fifo['share']:.1%} in arrival "
        f"order ({n} requests at once, 30% with deadlines 5-40 s, {TOKEN_S * 1000:.0f} ms a token, 256 in the engine)"
    )
    return ScenarioResult(
        "P10",
        "deadline attainment",
        measured,
        ordered["share"] / 0.95,
        ">= 95% of feasible deadlines met (ratio = share / 0.95; >= 1)",
        ordered["share"] >= 0.95,
        notes=notes,
    )


def _fairness(env: BenchEnv, backlog: int, ordered: bool, alone: bool = False) -> dict[str, Any]:
    rng = random.Random(11)
    name = "p11-alone" if alone else f"p11-{'fair' if ordered else 'arrival'}"
    with env.stack(_settings(env, name, ordered), run_sink=False) as stack:
        observer = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        try:
            warm = [client.submit(f"warm {i}", model="bench", max_tokens=8, cache=False) for i in range(8)]
            client.flush()
            observer.wait_keys(warm, timeout=120)
            a_ids = []
            if not alone:
                a_ids = [
                    client.submit(
                        f"tenant A item {i}",
                        model="bench",
                        priority="low",
                        tenant="A",
                        max_tokens=rng.randint(16, 128),
                        cache=False,
                    )
                    for i in range(backlog)
                ]
                client.flush()
                observer.wait_for(len(warm) + 256, timeout=300)  # the engine is full of A's work
            sent: dict[str, float] = {}
            for i in range(50):
                t = time.perf_counter()
                rid = client.submit(
                    f"tenant B item {i}",
                    model="bench",
                    priority="low",
                    tenant="B",
                    max_tokens=rng.randint(16, 128),
                    cache=False,
                )
                sent[rid] = t
            client.flush()
            observer.wait_keys(list(sent), timeout=900)
            b_latency = [(observer.arrivals[rid] - t) * 1000 for rid, t in sent.items()]
            results = dict(observer.results)
        finally:
            observer.close()
            client.close()
    # Fairness is a matter while both tenants have work waiting (both backlogged, as deficit
    # round robin is judged): from B's first submit until B's last request started, A waiting
    # throughout. Jain's index is over the tokens of the requests each was granted (started)
    # then. Beside it, the tokens generated for each from B's first submit until its last result:
    # B's 50 requests can never hold half of 256 slots, so that figure is bounded by B's demand
    # (about 0.7 with any order), not by the scheduler.
    b = [r for rid, r in results.items() if rid in sent]
    start = min(r.created_at for r in b)
    granted = {"A": 0.0, "B": 0.0}
    last_start = max(r.started_at for r in b)
    for r in results.values():
        if r.tenant in granted and start <= r.started_at <= last_start:
            granted[r.tenant] += r.completion_tokens
    end = max(r.completed_at for r in b)
    served = {"A": 0.0, "B": 0.0}
    for r in results.values():
        if r.tenant in served and r.completed_at > start and r.started_at < end:
            # The part of its generation inside the window.
            span = (r.completed_at - r.started_at).total_seconds() or 1e-9
            inside = (min(r.completed_at, end) - max(r.started_at, start)).total_seconds()
            served[r.tenant] += r.completion_tokens * max(0.0, inside) / span
    return {
        "b_p95_ms": percentile(b_latency, 0.95),
        "b_p50_ms": percentile(b_latency, 0.5),
        "jain": _jain(granted),
        "jain_served": _jain(served),
        "a": len(a_ids),
    }


def _jain(shares: dict[str, float]) -> float:
    total = sum(shares.values())
    return total**2 / (len(shares) * sum(v * v for v in shares.values())) if total else float("nan")


def run_p11(env: BenchEnv, quick: bool) -> ScenarioResult:
    backlog = 2_000 if quick else 5_000
    alone = _fairness(env, backlog, ordered=True, alone=True)
    fair = _fairness(env, backlog, ordered=True)
    fifo = _fairness(env, backlog, ordered=False)
    ratio = fair["b_p95_ms"] / alone["b_p95_ms"]
    measured = {
        "a_backlog": backlog,
        "b_alone_p95_ms": alone["b_p95_ms"],
        "b_fair_p95_ms": fair["b_p95_ms"],
        "b_arrival_p95_ms": fifo["b_p95_ms"],
        "jain_fair": fair["jain"],
        "jain_arrival": fifo["jain"],
        "jain_served_fair": fair["jain_served"],
        "jain_served_arrival": fifo["jain_served"],
    }
    notes = (
        f"B's p95 with A's {backlog}-request backlog: {ratio:.2f}x alone with fair share, "
        f"{fifo['b_p95_ms'] / alone['b_p95_ms']:.2f}x in arrival order; Jain's index of tokens granted while "
        f"both waited {fair['jain']:.3f} vs {fifo['jain']:.3f}; of tokens generated from B's first submit to its "
        f"last result {fair['jain_served']:.3f} vs {fifo['jain_served']:.3f} (bounded by B's 50 requests)"
    )
    return ScenarioResult(
        "P11",
        "tenant fairness",
        measured,
        ratio,
        "B's p95 <= 2x alone and Jain's index >= 0.95",
        ratio <= 2 and fair["jain"] >= 0.95,
        notes=notes,
    )
