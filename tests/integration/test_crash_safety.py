"""Delivery guarantees of the GPU consumers, counted the way a subscriber sees them: result messages
per request id on the results topic, and raw ClickHouse rows without ``FINAL``.

* kill -9 (three times, while requests are in the engine): every request gets a result; the
  requests that run twice are bounded by the in-flight window and keep their request id.
* SIGTERM: the consumer finishes what it can within ``drain_s``, aborts the rest uncommitted,
  and stops in bounded time; with the next consumer, every request has exactly one result.
* two replicas, one killed: its partitions move to the other; nothing is lost.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections import Counter

import pytest

from analytics.store import Store
from core.settings import Settings
from producers import SluiceClient
from schemas import RequestState, RequestStatus, Serde
from sluice.local.stack import Child, LocalStack, child_env
from tests.integration.helpers import TopicCounter, topic_keys, topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

logger = logging.getLogger(__name__)


def _raw_rows(store: Store, ids: list[str]) -> Counter[str]:
    rows = store.query(
        "SELECT request_id, count() FROM sluice.results WHERE request_id IN {ids:Array(String)} GROUP BY request_id",
        {"ids": ids},
    ).rows
    return Counter({r[0]: int(r[1]) for r in rows})


def _results_on_topic(settings: Settings, ids: list[str], quiet_s: float = 3.0) -> Counter[str]:
    wanted = set(ids)
    return Counter(k for k in topic_keys(settings, [settings.topic_prefix + "results"], quiet_s=quiet_s) if k in wanted)


def _in_flight(settings: Settings, ids: list[str]) -> set[str]:
    """Requests a consumer had put into its engine (status ``running``) without a result yet.

    Read after the kill, when nothing changes any more; the quiet period must outlast a new
    reader's first fetch, or a slow start reads as an empty topic."""
    serde = Serde()
    running = {
        r.request_id
        for r in topic_records(settings, settings.topic_prefix + "status", RequestStatus, serde, quiet_s=3.0)
        if r.state is RequestState.RUNNING
    }
    done = set(_results_on_topic(settings, ids, quiet_s=3.0))
    return (running & set(ids)) - done


def _consumer(stack: LocalStack, name: str = "gpu-tiny") -> Child:
    cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny"]
    return Child(name, cmd, child_env(stack.settings), stack.log_dir / f"{name}.log")


def test_kill_9_mid_run_loses_nothing_and_reruns_at_most_the_in_flight_window(
    settings: Settings, clickhouse_store: Store
) -> None:
    # 4 requests in the engine at a time, 0.4 s each, so a kill always lands on running work.
    settings = settings.evolve(engine={"instant_token_seconds": 0.1, "max_inflight": 4})
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    try:
        client = SluiceClient(stack.settings)
        ids = [client.submit(f"crash test {i}", max_tokens=4, cache=False) for i in range(60)]
        client.flush()
        killed_in_flight: list[set[str]] = []
        progress = TopicCounter(stack.settings, stack.settings.topic_prefix + "results")
        for k in range(3):
            child = _consumer(stack)
            wait_until(
                lambda: len(set(progress.counts()) & set(ids)),
                lambda n, k=k: n >= 12 * (k + 1),
                timeout=120,
                interval=0.05,
                what="progress before the kill",
            )
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
            child.stop()
            # Nothing changes on the topics any more: what was started and not answered was in flight.
            in_flight = _in_flight(stack.settings, ids)
            logger.info("kill %d hit in-flight requests %s", k + 1, sorted(in_flight))
            killed_in_flight.append(in_flight)
        progress.close()
        assert all(killed_in_flight), f"a kill found nothing in the engine: {killed_in_flight}"
        child = _consumer(stack)
        try:
            on_topic = wait_until(
                lambda: _results_on_topic(stack.settings, ids),
                lambda c: len(c) == len(ids),
                timeout=180,
                what="a result for every request after the kills",
            )
        finally:
            child.stop()
        duplicates = {rid: n - 1 for rid, n in on_topic.items() if n > 1}
        # The in-flight window per kill: what was in the engine (4, +1 headroom slot) and what
        # finished since the last offset commit (every 200 ms: at most a few more).
        window = 2 * (settings.engine.max_inflight + 1)
        assert sum(duplicates.values()) <= 3 * window, duplicates
        # Every request has a raw row (no FINAL): none went missing between the topic and ClickHouse.
        rows = wait_until(
            lambda: _raw_rows(clickhouse_store, ids), lambda c: set(c) == set(ids), timeout=60, what="raw rows"
        )
        assert set(rows) == set(ids)
        logger.info("kill -9 x3: %d duplicate result message(s): %s", sum(duplicates.values()), duplicates)
    finally:
        stack.stop()


def test_sigterm_drains_in_bounded_time_and_nothing_runs_twice(settings: Settings, clickhouse_store: Store) -> None:
    settings = settings.evolve(engine={"instant_token_seconds": 0.05, "max_inflight": 4, "drain_s": 2.0})
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    try:
        client = SluiceClient(stack.settings)
        # The first takes 15 s, longer than the drain grace: it is aborted and left uncommitted;
        # the others take 1 s each.
        endless = client.submit("longer than the grace period", max_tokens=300, cache=False)
        ids = [endless, *[client.submit(f"drain test {i}", max_tokens=20, cache=False) for i in range(24)]]
        client.flush()
        child = _consumer(stack)
        wait_until(
            lambda: len(_results_on_topic(stack.settings, ids, quiet_s=0.3)),
            lambda n: n >= 4,
            timeout=120,
            what="work under way",
        )
        in_flight = _in_flight(stack.settings, ids)
        assert in_flight, "nothing was running when SIGTERM came"
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        child.proc.wait(30)
        stopped_in = time.monotonic() - t0
        child.stop()
        assert child.proc.returncode == 0, child.tail()
        assert stopped_in <= settings.engine.drain_s + 5, stopped_in
        child = _consumer(stack, "gpu-tiny-next")
        try:
            on_topic = wait_until(
                lambda: _results_on_topic(stack.settings, ids),
                lambda c: len(c) == len(ids),
                timeout=180,
                what="every result after the graceful stop",
            )
        finally:
            child.stop()
        assert on_topic == Counter({rid: 1 for rid in ids})
    finally:
        stack.stop()


def test_two_replicas_one_killed_its_partitions_move_and_nothing_is_lost(
    settings: Settings, clickhouse_store: Store
) -> None:
    # A consumer group's partitions moving to the survivor (the share group's failover is in
    # test_share_groups.py).
    settings = settings.evolve(engine={"instant_token_seconds": 0.05, "max_inflight": 4}, consumer={"group": "classic"})
    stack = LocalStack(settings, store=clickhouse_store, replicas=2).start()
    try:
        consumers = [c for c in stack.children if c.name.startswith("gpu-tiny-")]
        assert [c.name for c in consumers] == ["gpu-tiny-0", "gpu-tiny-1"]
        wait_until(
            lambda: [c.tail(200).count("assigned [") for c in consumers],
            lambda n: all(n),
            timeout=60,
            what="both replicas holding partitions",
        )
        client = SluiceClient(stack.settings)
        ids = [client.submit(f"failover {i}", max_tokens=4, cache=False) for i in range(120)]
        client.flush()
        wait_until(lambda: len(_results_on_topic(stack.settings, ids, quiet_s=0.3)), lambda n: n >= 20, timeout=120)
        consumers[0].proc.send_signal(signal.SIGKILL)
        consumers[0].proc.wait()
        on_topic = wait_until(
            lambda: _results_on_topic(stack.settings, ids),
            lambda c: len(c) == len(ids),
            timeout=120,
            what="every result after one replica died",
        )
        assert sum(n - 1 for n in on_topic.values()) <= 2 * (settings.engine.max_inflight + 1)
        assert consumers[1].alive()
    finally:
        stack.stop()
