"""P7: failover between two GPU consumer replicas under load, in both consumption modes.

Two consumers of one model share its partitions in one consumer group (``sluice up --replicas
2``). Under a steady load one is killed with SIGKILL; the figure is the time from the kill until
the first result for a request *submitted after the kill* that landed on the dead consumer's
partitions (the group notices after the session timeout and moves them to the survivor; results
the victim produced just before it died, read just after, do not count), and how many submitted
requests never got a result (target 0). Duplicates (requests re-run because they were in flight at the kill) are
counted on the results topic and reported beside it. The instant test engine stands in for the
GPU: what is measured is the group's failover, not the model.

On Apache Kafka the same kill is measured in a consumer group and in a share group side by side:
there, the figure is the time from the kill until the first of the requests the victim was
running (its ``running`` status events name its engine run) is answered by the survivor — a
share group redelivers them when the dead member's session ends (6 s on the local runner), a
consumer group when its session times out. P7x: throughput of two share consumers on a
one-partition topic against one consumer group replica (the second one idles: partitions cap a
consumer group).
"""

from __future__ import annotations

import ast
import re
import signal
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, kafka_unavailable
from core import clients
from core.settings import Settings
from producers import SluiceClient
from schemas import RequestState, RequestStatus

__all__ = ["run_p7"]

_ASSIGNMENT = re.compile(r"\b(assigned|revoked) (\[.*\])")


def _owned(log_text: str) -> set[tuple[str, int]]:
    """The partitions a consumer owned, replayed from its assigned/revoked log lines."""
    owned: set[tuple[str, int]] = set()
    for line in log_text.splitlines():
        m = _ASSIGNMENT.search(line)
        if m is None:
            continue
        parts = {(t, p) for t, p in ast.literal_eval(m.group(2))}
        owned = owned | parts if m.group(1) == "assigned" else owned - parts
    return owned


def _load_with_kill(
    client: SluiceClient, victim: Any, total: int, rate: float, kill_after: float, tag: str
) -> tuple[list[str], dict[str, float], float]:
    """Submit ``total`` requests at ``rate`` per second, killing ``victim`` with SIGKILL
    ``kill_after`` seconds in; returns the ids, when each was submitted, and when the kill was."""
    ids: list[str] = []
    submitted_at: dict[str, float] = {}
    killed_at = 0.0
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        if killed_at == 0.0 and time.perf_counter() - start >= kill_after:
            victim.popen.send_signal(signal.SIGKILL)
            killed_at = time.perf_counter()
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        rid = client.submit(f"{tag} {i}", tenant="bench", max_tokens=8, cache=False)
        submitted_at[rid] = time.perf_counter()
        ids.append(rid)
        client.poll()
    client.flush()
    return ids, submitted_at, killed_at


def _run_p7_tansu(env: BenchEnv, quick: bool) -> ScenarioResult:
    total, rate, kill_after = (600, 40.0, 5.0) if quick else (3000, 100.0, 10.0)
    settings = env.settings("p7", instant_catalog(), engine={"kind": "instant", "instant_token_seconds": 0.01})
    session_s = settings.kafka.session_timeout_ms / 1000
    heartbeat_s = settings.kafka.heartbeat_interval_ms / 1000
    # Not supervised: the killed replica stays dead, so the survivor is what serves its partitions.
    with env.stack(settings, replicas=2, supervise=False) as stack:
        results = Observer(stack.settings, [stack.topics.results])
        routed = Observer(stack.settings, stack.topics.model_topics("bench"))
        client = SluiceClient(stack.settings)
        victim = next(c for c in stack.children if c.name.endswith("-0"))
        ids: list[str] = []
        submitted_at: dict[str, float] = {}
        killed_at = 0.0
        try:
            warm = client.submit("warm-up", tenant="bench", max_tokens=8, cache=False)
            client.flush()
            results.wait_keys([warm], timeout=120)
            # Both replicas hold partitions before the load starts.
            deadline = time.monotonic() + 60
            while not all(
                _owned(c.log_path.read_text(errors="replace")) for c in stack.children if c.name.startswith("gpu")
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("the replicas never both held partitions")
                time.sleep(0.2)
            ids, submitted_at, killed_at = _load_with_kill(client, victim, total, rate, kill_after, "p7 request")
            results.wait_keys(ids, timeout=120 + session_s)
            routed.wait_keys(ids, timeout=30)
        finally:
            results.close()
            routed.close()
        victim.popen.wait()
        orphaned = _owned(victim.log_path.read_text(errors="replace"))
    on_victim = [rid for rid in ids if routed.partitions.get(rid) in orphaned]
    after_kill = [rid for rid in on_victim if submitted_at[rid] > killed_at]
    served_again = min((results.arrivals[rid] for rid in after_kill), default=float("nan"))
    gap = served_again - killed_at
    lost = sum(1 for rid in ids if rid not in results.arrivals)
    duplicates = sum(results.counts[rid] - 1 for rid in ids if rid in results.counts)
    return ScenarioResult(
        "P7",
        "failover between two replicas",
        {
            "requests": total,
            "rate_per_s": rate,
            "session_timeout_s": session_s,
            "seconds_until_served_again": gap,
            "lost": lost,
            "duplicate_results": duplicates,
            "requests_on_killed_partitions": len(on_victim),
            "of_them_submitted_after_the_kill": len(after_kill),
        },
        gap / (session_s + 5),
        "session timeout <= served again <= session timeout + 5 s, 0 lost",
        # Faster than the session timeout would beat physics: the group cannot know sooner.
        session_s - heartbeat_s - 0.5 <= gap <= session_s + 5 and lost == 0,
    )


def _running_on(settings: Settings, run_id: str, quiet_s: float = 2.0) -> set[str]:
    """Requests whose ``running`` status names engine run ``run_id``."""
    serde = clients.serde(settings)
    topic = f"{settings.topic_prefix}status"
    consumer = clients.consumer(settings.kafka, "bench-status", f"{settings.topic_prefix}p7-{uuid.uuid4().hex[:6]}")
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta[topic].partitions])
    found: set[str] = set()
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error() is not None or msg.value() is None:
                    continue
                last = time.monotonic()
                status = serde.decode(RequestStatus, msg.value())
                if status.state is RequestState.RUNNING and run_id in (status.detail or ""):
                    found.add(status.request_id)
    finally:
        consumer.close()
    return found


def _p7_kafka(env: BenchEnv, quick: bool, mode: str) -> dict[str, float]:
    """Kill one of two replicas on Apache Kafka; time until the victim's running requests are
    answered by the survivor."""
    total, rate, kill_after = (400, 40.0, 4.0) if quick else (2000, 100.0, 10.0)
    settings = env.settings(
        f"p7-{mode}",
        instant_catalog(),
        engine={"kind": "instant", "instant_token_seconds": 0.05, "max_inflight": 8},
        consumer={"group": mode, "lock_duration_s": 60},
    )
    with env.stack(settings, replicas=2, supervise=False, broker="kafka", durable=True) as stack:
        results = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        victim = next(c for c in stack.children if c.name.endswith("-0"))
        ids: list[str] = []
        killed_at = 0.0
        try:
            warm = [client.submit(f"warm-up {i}", tenant="bench", max_tokens=8, cache=False) for i in range(20)]
            client.flush()
            results.wait_keys(warm, timeout=120)
            ids, _, killed_at = _load_with_kill(client, victim, total, rate, kill_after, f"p7 {mode}")
            results.wait_keys(ids, timeout=180)
            time.sleep(3)  # a quiet period: a late duplicate still counts
        finally:
            results.close()
        victim.popen.wait()
        seen = results.results.items()
        before = {r.engine_run_id for rid, r in seen if results.arrivals[rid] < killed_at}
        # A run that answered seconds after the kill is the survivor's (the victim's last results
        # may be read just after it).
        survivor_runs = {r.engine_run_id for rid, r in seen if results.arrivals[rid] > killed_at + 2}
        victim_runs = {run for run in before - survivor_runs if run}
        started: set[str] = set()
        for run in victim_runs:
            started |= _running_on(stack.settings, run)
        # Held at the kill: started by the victim, answered by another run.
        held = {
            rid for rid in started if rid in results.results and results.results[rid].engine_run_id not in victim_runs
        }
    redone = [rid for rid in held if rid in results.arrivals and results.arrivals[rid] > killed_at]
    first = min((results.arrivals[rid] for rid in redone), default=float("nan"))
    last = max((results.arrivals[rid] for rid in redone), default=float("nan"))
    return {
        "seconds_until_served_again": first - killed_at,
        "seconds_until_all_served": last - killed_at,
        "running_on_victim_at_kill": len(held),
        "lost": sum(1 for rid in ids if rid not in results.arrivals),
        "duplicate_results": sum(results.counts[rid] - 1 for rid in ids if rid in results.counts),
    }


def _throughput(env: BenchEnv, quick: bool, mode: str) -> float:
    """Requests/s of two replicas on a one-partition model topic (instant engine, 8 at a time)."""
    n = 600 if quick else 3000
    settings = env.settings(
        f"p7x-{mode}",
        instant_catalog(),
        kafka={"partitions": 1},
        engine={"kind": "instant", "instant_token_seconds": 0.01, "max_inflight": 8},
        consumer={"group": mode},
    )
    with env.stack(settings, replicas=2, broker="kafka", durable=True) as stack:
        results = Observer(stack.settings, [stack.topics.results])
        client = SluiceClient(stack.settings)
        try:
            warm = [client.submit(f"warm-up {i}", tenant="bench", max_tokens=8, cache=False) for i in range(20)]
            client.flush()
            results.wait_keys(warm, timeout=120)
            t0 = time.perf_counter()
            ids = [client.submit(f"p7x {mode} {i}", tenant="bench", max_tokens=8, cache=False) for i in range(n)]
            client.flush()
            results.wait_keys(ids, timeout=300)
            elapsed = max(results.arrivals[rid] for rid in ids) - t0
        finally:
            results.close()
    return n / elapsed


def run_p7(env: BenchEnv, quick: bool) -> list[ScenarioResult]:
    out = [_run_p7_tansu(env, quick)]
    why_not = kafka_unavailable()
    if why_not is not None:
        out[0].notes = f"share groups not measured: {why_not}"
        return out
    classic = _p7_kafka(env, quick, "classic")
    share = _p7_kafka(env, quick, "share")
    measured = {f"classic_{k}": v for k, v in classic.items()} | {f"share_{k}": v for k, v in share.items()}
    out.append(
        ScenarioResult(
            "P7",
            "failover on Apache Kafka: consumer group vs share group",
            measured,
            share["seconds_until_served_again"] / max(classic["seconds_until_served_again"], 1e-9),
            "share group: 0 lost, duplicates <= requests the victim held (ratio: share/classic time to re-serve)",
            share["lost"] == 0
            and classic["lost"] == 0
            and share["duplicate_results"] <= share["running_on_victim_at_kill"] + 8,
        )
    )
    one = _throughput(env, quick, "classic")
    two = _throughput(env, quick, "share")
    out.append(
        ScenarioResult(
            "P7",
            "two replicas on one partition: share group vs consumer group",
            {"classic_req_s": one, "share_req_s": two},
            two / one,
            "share >= 1.5x classic (a consumer group's second replica idles on one partition)",
            two >= 1.5 * one,
        )
    )
    return out
