"""GPU consumers as a Kafka share group (KIP-932) on Apache Kafka: more consumers than partitions,
each request acknowledged on its own. Counted as a subscriber sees it: result messages per request
id on the results topic after a quiet period, and the model topics' own messages."""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest

from analytics.store import Store
from core.catalog import load_catalog
from core.settings import Settings
from gpu_consumers.instant_engine import PROCESS_KILLER, InstantTestEngine
from gpu_consumers.worker import GpuWorker
from producers import SluiceClient
from schemas import DeadLetter, InferenceResult, Serde
from sluice.local.process import free_port
from sluice.local.stack import Child, LocalStack, child_env
from tests.integration.conftest import TEST_BROKER
from tests.integration.helpers import topic_keys, topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

SERDE = Serde()


@pytest.fixture
def share_settings(settings: Settings) -> Settings:
    if TEST_BROKER != "kafka":
        pytest.skip("share groups need Apache Kafka 4.2+ (tansu has none)")
    # Two partitions per model topic; the broker's shortest record lock, so a dead consumer's
    # requests come back within seconds.
    return settings.evolve(
        kafka={"partitions": 2},
        consumer={"group": "share", "lock_duration_s": 15, "lanes_per_priority": 2},
        engine={"instant_token_seconds": 0.01},
    )


@pytest.fixture
def stack(share_settings: Settings, clickhouse_store: Store) -> Iterator[LocalStack]:
    stack = LocalStack(share_settings, store=clickhouse_store, run_consumers=False).start()
    yield stack
    stack.stop()


class Consumer:
    """One ``python -m gpu_consumers`` process, with its /metrics."""

    def __init__(self, stack: LocalStack, name: str, settings: Settings | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny", "--metrics-port", str(self.port)]
        self.child = Child(name, cmd, child_env(settings or stack.settings), stack.log_dir / f"{name}.log")

    def metric(self, name: str) -> float:
        """The sum of a series' samples (0 while the process is still starting)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " "))
        )

    def stop(self) -> None:
        self.child.stop()


def _submit(stack: LocalStack, n: int, tag: str, **kw: object) -> list[str]:
    client = SluiceClient(stack.settings)
    ids = [client.submit(f"{tag} {i}", cache=False, max_tokens=8, **kw) for i in range(n)]  # type: ignore[arg-type]
    client.flush()
    return ids


def _answered(stack: LocalStack, ids: list[str], quiet_s: float = 0.5) -> Counter[str]:
    wanted = set(ids)
    return Counter(k for k in topic_keys(stack.settings, [stack.topics.results], quiet_s=quiet_s) if k in wanted)


def _dead_letters(stack: LocalStack, quiet_s: float = 0.5) -> list[DeadLetter]:
    return topic_records(stack.settings, stack.topics.dead_letter, DeadLetter, SERDE, quiet_s=quiet_s)


def _results(stack: LocalStack, quiet_s: float = 3.0) -> list[InferenceResult]:
    return topic_records(stack.settings, stack.topics.results, InferenceResult, SERDE, quiet_s=quiet_s)


def test_four_consumers_share_a_two_partition_topic_and_each_request_is_answered_once(stack: LocalStack) -> None:
    consumers = [Consumer(stack, f"gpu-{i}") for i in range(4)]
    try:
        wait_until(lambda: all(c.child.alive() for c in consumers), timeout=30, what="four consumers")
        ids: list[str] = []
        for wave in range(8):  # requests arrive over time, as they do
            ids += _submit(stack, 50, f"share wave {wave}")
            time.sleep(0.5)
        wait_until(lambda: _answered(stack, ids), lambda c: len(c) == len(ids), timeout=180, what="every result")
        results = [r for r in _results(stack, quiet_s=5.0) if r.request_id in set(ids)]
        per_request = Counter(r.request_id for r in results)
        per_consumer = Counter(r.engine_run_id for r in results)
        print(f"4 consumers on 2 partitions: per consumer {sorted(per_consumer.values())}")
        assert per_request == Counter({rid: 1 for rid in ids})
        assert len(per_consumer) == 4 and min(per_consumer.values()) > 0
    finally:
        for c in consumers:
            c.stop()


def test_kill_9_of_a_consumer_redelivers_only_what_it_held(stack: LocalStack, share_settings: Settings) -> None:
    slow = share_settings.evolve(engine={"instant_token_seconds": 0.05, "max_inflight": 4})
    consumers = [Consumer(stack, f"gpu-{i}", slow) for i in range(3)]
    try:
        ids = _submit(stack, 240, "kill one")
        victim = consumers[0]
        wait_until(lambda: victim.metric("sluice_share_acknowledgements"), lambda n: n >= 4, timeout=60, what="work")
        held = victim.metric("sluice_acquired_requests")
        victim.child.popen.send_signal(signal.SIGKILL)  # nothing acknowledged, nothing released
        on_topic = wait_until(
            lambda: _answered(stack, ids), lambda c: len(c) == len(ids), timeout=240, what="every result"
        )
        on_topic = _answered(stack, ids, quiet_s=5.0)
        duplicates = sum(n - 1 for n in on_topic.values())
        # What a consumer may hold: its engine slots, a small prefetch and one poll's batch.
        bound = 4 + 2 + 4
        print(f"kill -9 of 1 of 3 share consumers: 0 lost, {duplicates} duplicates, {held:.0f} held at the kill")
        assert len(on_topic) == len(ids)
        assert duplicates <= bound
    finally:
        for c in consumers:
            c.stop()


def test_short_requests_are_acknowledged_while_a_long_one_runs(stack: LocalStack, share_settings: Settings) -> None:
    settings = share_settings.evolve(engine={"instant_token_seconds": 0.02, "max_inflight": 16})
    catalog = load_catalog(settings.catalog_path)
    engine = InstantTestEngine("tiny", token_seconds=0.02, max_inflight=16, max_model_len=100_000)
    worker = GpuWorker(settings, catalog, "tiny", engine, watch_cancellations=False)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    client = SluiceClient(stack.settings)
    long_id = client.submit("the long one", cache=False, max_tokens=1000)  # ~20 s of engine steps
    client.flush()
    thread.start()
    try:
        wait_until(lambda: long_id in worker.inflight, timeout=60, what="the long request to start")
        short = [client.submit(f"short {i}", cache=False, max_tokens=4) for i in range(200)]
        client.flush()
        # Each short request is accepted as it finishes, while the long one still runs (a
        # consumer group could commit none of them past the long one's offset).
        wait_until(lambda: worker.acknowledged.get("accept", 0), lambda n: n >= 50, timeout=60, what="acks")
        assert long_id in worker.inflight
        # All of them, whatever a busy share consumer fetched ahead (see the README's note on
        # librdkafka's share consumer): within the long request's run and one record lock.
        answered = wait_until(lambda: _answered(stack, short), lambda c: len(c) == len(short), timeout=120)
        assert answered == Counter({rid: 1 for rid in short})
    finally:
        stop.set()
        thread.join(60)


def test_a_request_that_kills_its_consumer_is_dead_lettered_at_the_delivery_limit(
    share_settings: Settings, clickhouse_store: Store
) -> None:
    settings = share_settings.evolve(consumer={"delivery_limit": 3}, engine={"instant_token_seconds": 0.005})
    # Supervised consumers: the stack restarts one that died, as a deployment would.
    stack = LocalStack(settings, store=clickhouse_store, replicas=2, max_restarts=10).start()
    try:
        client = SluiceClient(stack.settings)
        pill = client.submit(f"this one kills its consumer: {PROCESS_KILLER}", cache=False, max_tokens=8)
        ids = [client.submit(f"an ordinary request {i}", cache=False, max_tokens=8) for i in range(30)]
        client.flush()
        dead = wait_until(
            lambda: [d for d in _dead_letters(stack) if d.request_id == pill],
            timeout=240,
            what="the pill's dead letter",
        )
        assert dead[0].reason.value == "retries_exhausted" and "delivered 3 times" in dead[0].error
        wait_until(lambda: _answered(stack, [pill, *ids]), lambda c: len(c) == 31, timeout=120)
        results = _results(stack)
        failed = [r for r in results if r.request_id == pill]
        assert [r.status.value for r in failed] == ["failed"]
        # Each kill hands back what that consumer had acquired and not acknowledged: a request
        # it had finished in its last acknowledgement interval runs again (at least once), and
        # one that was acquired beside the pill at every kill reaches the delivery limit with it
        # (the broker counts deliveries per record, not per culprit). Never lost, and one engine
        # run never answers a request twice.
        outcomes: dict[str, list[tuple[str, str | None]]] = {}
        for r in results:
            if r.request_id in set(ids):
                outcomes.setdefault(r.request_id, []).append((r.status.value, r.engine_run_id))
        succeeded = {rid for rid, outs in outcomes.items() if any(s == "succeeded" for s, _ in outs)}
        bystanders = [r for r in _dead_letters(stack) if r.request_id in set(ids) - succeeded]
        repeats = {rid: outs for rid, outs in outcomes.items() if len(outs) > 1}
        print(
            f"delivery limit 3: {len(succeeded)} of 30 ordinary requests succeeded, {len(bystanders)} dead-lettered "
            f"beside the pill, {len(repeats)} run again after a kill"
        )
        assert set(outcomes) == set(ids)
        assert {b.request_id for b in bystanders} == set(ids) - succeeded
        assert all(b.reason.value == "retries_exhausted" for b in bystanders)
        assert all(len({run for _, run in outs}) == len(outs) for outs in repeats.values()), repeats
        # The pill is gone (rejected): the restarted consumers serve what comes next.
        after = [client.submit(f"a request after the pill {i}", cache=False, max_tokens=8) for i in range(20)]
        client.flush()
        wait_until(lambda: _answered(stack, after), lambda c: len(c) == len(after), timeout=120, what="later results")
        assert {r.request_id: r.status.value for r in _results(stack) if r.request_id in set(after)} == {
            rid: "succeeded" for rid in after
        }
    finally:
        stack.stop()


def test_sigterm_releases_unstarted_requests_to_the_others_without_copies(
    stack: LocalStack, share_settings: Settings
) -> None:
    slow = share_settings.evolve(engine={"instant_token_seconds": 0.05, "max_inflight": 4, "drain_s": 1})
    consumers = [Consumer(stack, f"gpu-{i}", slow) for i in range(2)]
    try:
        ids = _submit(stack, 80, "drain")
        leaving = consumers[0]
        wait_until(lambda: leaving.metric("sluice_acquired_requests"), lambda n: n > 0, timeout=60, what="work")
        leaving.child.popen.send_signal(signal.SIGTERM)
        leaving.child.popen.wait(30)
        on_topic = wait_until(
            lambda: _answered(stack, ids), lambda c: len(c) == len(ids), timeout=180, what="every result"
        )
        on_topic = _answered(stack, ids, quiet_s=5.0)
        assert on_topic == Counter({rid: 1 for rid in ids})
        # Released, not re-produced: the model topics hold each request once.
        model_keys = topic_keys(stack.settings, stack.topics.model_topics("tiny"), quiet_s=1.0)
        assert Counter(k for k in model_keys if k in set(ids)) == Counter({rid: 1 for rid in ids})
    finally:
        for c in consumers:
            c.stop()
