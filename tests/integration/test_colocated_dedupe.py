"""Dedupe without the repartition hop: Sluice's producers key a request by its dedupe key with
Kafka's partitioner, so it lands on the partition of its table entry and the router settles it
there; a foreign producer's request (any key, any partition) takes the hop and is deduplicated
all the same. Counted as a subscriber sees it: results per request id on the results topic."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from core import clients
from core.placement import dedupe_key, partition_for
from producers import SluiceClient
from schemas import ChatMessage, InferenceRequest, InferenceResult, Serde
from sluice.local.stack import LocalStack
from tests.integration.helpers import TopicCounter, topic_records
from tests.integration.test_metrics import scrape, value
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _paths(url: str) -> tuple[float, float]:
    m = scrape(url)
    name = "sluice_dedupe_requests_total"
    return value(m, name, path="local"), value(m, name, path="repartitioned")


def _request_partitions(stack: LocalStack, topic: str) -> list[tuple[bytes, int]]:
    """(key, partition) of every message on a request topic."""
    consumer = clients.consumer(
        stack.settings.kafka, "test", f"{stack.settings.topic_prefix}keys-{uuid.uuid4().hex[:6]}"
    )
    try:
        n = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
        seen: list[tuple[bytes, int]] = []
        quiet = time.monotonic()
        while time.monotonic() - quiet < 3:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    seen.append((msg.key() or b"", msg.partition() or 0))
                    quiet = time.monotonic()
        return seen
    finally:
        consumer.close()


def test_sluice_keyed_requests_skip_the_hop_and_foreign_ones_take_it(
    make_stack: Callable[..., LocalStack],
) -> None:
    stack = make_stack(engine={"instant_token_seconds": 0.05})
    url = stack.metrics_urls["processor"]
    topic = stack.topics.requests("normal")
    counter = TopicCounter(stack.settings, stack.topics.results)
    try:
        client = SluiceClient(stack.settings)
        # Sluice's producer: 4 copies of one prompt and 8 other prompts, all settled in place.
        same = [client.submit("what does a rebalance cost?", tenant="co", max_tokens=20) for _ in range(4)]
        others = [client.submit(f"other question {i}", tenant="co", max_tokens=4) for i in range(8)]
        client.flush()
        mine = [*same, *others]
        wait_until(counter.counts, lambda c: all(c[r] for r in mine), timeout=120, what="results")
        # librdkafka's murmur2_random and core.placement agree on a real broker: every request is
        # on the partition its key maps to.
        n = stack.settings.kafka.partitions
        placed = _request_partitions(stack, topic)
        assert len(placed) >= len(mine)
        assert all(p == partition_for(k, n) for k, p in placed), placed
        local, hopped = _paths(url)
        assert (local, hopped) == (len(mine), 0)

        # A foreign producer: one prompt 6 times, keyed by random ids, one copy per partition in
        # turn, so most arrive away from their table partition and take the hop.
        serde = Serde()
        copies = [
            InferenceRequest(
                request_id=f"foreign-{uuid.uuid4().hex[:8]}",
                tenant="co",
                messages=[ChatMessage(role="user", content="a prompt from a Java service")],
                max_tokens=20,
            )
            for _ in range(6)
        ]
        home = partition_for(dedupe_key(copies[0], stack.settings.processor).encode(), n)  # type: ignore[union-attr]
        producer = clients.producer(stack.settings.kafka, "foreign")
        for i, r in enumerate(copies):
            producer.produce(
                topic, key=uuid.uuid4().bytes, value=serde.encode(r), partition=i % n, headers=[("tenant", b"co")]
            )
        assert producer.flush(30) == 0
        ids = [r.request_id for r in copies]
        wait_until(counter.counts, lambda c: all(c[r] for r in ids), timeout=120, what="foreign results")
        time.sleep(3)  # quiet period: a second answer would show now
        counts = counter.counts()
        assert [counts[r] for r in [*mine, *ids]] == [1] * (len(mine) + len(ids)), counts

        local2, hopped2 = _paths(url)
        away = sum(1 for i in range(len(copies)) if i % n != home)
        assert hopped2 == away and local2 - local == len(copies) - away, (local2, hopped2, home)

        results = {
            r.request_id: r
            for r in topic_records(stack.settings, stack.topics.results, InferenceResult, serde)
            if r.request_id in set(mine) | set(ids)
        }
        for group in (same, ids):
            ran = [r for r in group if results[r].deduplicated_from is None]
            assert len(ran) == 1, Counter(results[r].deduplicated_from for r in group)
            assert all(results[r].deduplicated_from == ran[0] for r in group if r != ran[0])
    finally:
        counter.close()
