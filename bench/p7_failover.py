"""P7: failover between two GPU consumer replicas under load.

Two consumers of one model share its partitions in one consumer group (``sluice up --replicas
2``). Under a steady load one is killed with SIGKILL; the figure is the time from the kill until
the first result for a request *submitted after the kill* that landed on the dead consumer's
partitions (the group notices after the session timeout and moves them to the survivor; results
the victim produced just before it died, read just after, do not count), and how many submitted
requests never got a result (target 0). Duplicates (requests re-run because they were in flight at the kill) are
counted on the results topic and reported beside it. The instant test engine stands in for the
GPU: what is measured is the group's failover, not the model.
"""

from __future__ import annotations

import ast
import re
import signal
import time

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog
from producers import SluiceClient

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


def run_p7(env: BenchEnv, quick: bool) -> ScenarioResult:
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
            start = time.perf_counter()
            for i in range(total):
                due = start + i / rate
                if killed_at == 0.0 and time.perf_counter() - start >= kill_after:
                    victim.popen.send_signal(signal.SIGKILL)
                    killed_at = time.perf_counter()
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                rid = client.submit(f"p7 request {i}", tenant="bench", max_tokens=8, cache=False)
                submitted_at[rid] = time.perf_counter()
                ids.append(rid)
                client.poll()
            client.flush()
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
