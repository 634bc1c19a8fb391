"""Broker faults on a 3-node Apache Kafka cluster (replication factor 3, ``min.insync.replicas=2``)
with traffic in flight: kill -9 of the broker leading the model topic's partitions and its restart
later, then a rolling restart of all three. Every acknowledged request is answered, none is lost;
duplicates (the same request id twice on the results topic) are counted and stay within the
README's bound: the in-flight window of the consumer, once per fault."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

from analytics.store import Store
from core import clients
from core.errors import SluiceError
from core.settings import Settings
from producers import SluiceClient
from sluice.local.kafka import KafkaCluster
from sluice.local.stack import LocalStack
from tests.integration.conftest import TEST_BROKER
from tests.integration.helpers import TopicCounter
from tests.support import unavailable, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    if TEST_BROKER != "kafka":
        pytest.skip("broker faults are tested on Apache Kafka")
    c = KafkaCluster(tmp_path / "cluster", nodes=3, heap="512m")
    try:
        c.start()
    except SluiceError as exc:
        unavailable("a 3-node Apache Kafka cluster", exc)
    yield c
    c.stop()


def _fully_replicated(settings: Settings, topics: list[str]) -> bool:
    try:
        meta = clients.admin(settings.kafka, "test").list_topics(timeout=5).topics
    except KafkaException:
        return False
    return all(len(p.isrs) == 3 for t in topics for p in meta[t].partitions.values())


def _leader_of_most(settings: Settings, topic: str) -> int:
    meta = clients.admin(settings.kafka, "test").list_topics(timeout=10).topics[topic]
    leaders = Counter(p.leader for p in meta.partitions.values())
    return leaders.most_common(1)[0][0]


def test_broker_kill_and_rolling_restart_lose_nothing(
    settings: Settings, clickhouse_store: Store, cluster: KafkaCluster
) -> None:
    settings = settings.evolve(
        kafka={"bootstrap_servers": cluster.bootstrap_servers, "replication_factor": 3},
        engine={"instant_token_seconds": 0.01},
    )
    stack = LocalStack(settings, store=clickhouse_store).start()
    acked: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        # Acknowledged means flush() returned: only those are promised.
        with SluiceClient(stack.settings) as client:
            i = 0
            while not stop.is_set():
                chunk = [client.submit(f"fault {i + j}", model="tiny", max_tokens=4, cache=False) for j in range(10)]
                i += 10
                try:
                    client.flush()
                    acked.extend(chunk)
                except SluiceError:
                    refused.extend(chunk)
                time.sleep(0.1)

    counter = TopicCounter(stack.settings, stack.topics.results)
    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        model_topics = stack.topics.model_topics("tiny")
        wait_until(lambda: len(acked), lambda n: n >= 100, timeout=60, what="traffic to flow")
        leader = _leader_of_most(stack.settings, model_topics[1])
        cluster.kill(leader - 1)
        time.sleep(8)  # the fault lasts: clients see the leader gone, partitions move
        cluster.restart(leader - 1)
        wait_until(lambda: _fully_replicated(stack.settings, model_topics), timeout=120, what="ISR 3 again")
        for i in range(3):
            cluster.stop_node(i)
            cluster.restart(i)
            wait_until(lambda: _fully_replicated(stack.settings, model_topics), timeout=120, what="ISR 3 again")
        time.sleep(2)
        stop.set()
        sender.join(60)
        assert len(acked) >= 200, len(acked)
        wanted = set(acked)
        wait_until(lambda: wanted <= set(counter.counts()), timeout=240, what="an answer to every acked request")
        # Quiet period: a late duplicate from a redelivery would show here.
        time.sleep(5)
        seen = counter.counts()
        lost = [rid for rid in acked if seen[rid] == 0]
        duplicates = sum(seen[rid] - 1 for rid in acked if seen[rid] > 1)
        print(f"acked {len(acked)}, refused {len(refused)}, lost {len(lost)}, duplicates {duplicates}")
        assert lost == []
        # README: at most the in-flight window (max_inflight plus the priority slots) per fault.
        inflight = (settings.engine.max_inflight or 64) * 2
        assert duplicates <= 4 * inflight, duplicates
        assert stack.kafka is None and cluster.alive()
    finally:
        stop.set()
        counter.close()
        stack.stop()
