"""Where requests land (core.placement) and when the router settles one in place (Colocated)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from core.catalog import Catalog
from core.kafka import Out
from core.kafka.stub import StubBroker
from core.kafka_config import producer_config
from core.placement import dedupe_key, murmur2, partition_for, placement_key
from core.settings import KafkaSettings, ProcessorSettings, Settings
from core.topics import Topics
from producers import SluiceClient
from schemas import ChatMessage, InferenceRequest, Serde
from stream_processors.colocate import Colocated
from stream_processors.dedupe import DedupeStage
from stream_processors.emit import Emitter
from stream_processors.pipeline import RequestPipeline
from tests.support import model_entry

SERDE = Serde()
TOPICS = Topics("u.")
CATALOG = Catalog(
    models=[model_entry("cheap", tier=1, context_length=4000, input_price_per_1m=1, output_price_per_1m=2)]
)


# Kafka's own test vectors (UtilsTest.testMurmur2), as signed Java ints.
@pytest.mark.parametrize(
    ("data", "java"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_kafkas(data: bytes, java: int) -> None:
    assert murmur2(data) == java & 0xFFFFFFFF


def test_partition_for_agrees_with_the_java_compatible_partitioner_faust_uses() -> None:
    rng = random.Random(7)
    for _ in range(500):
        key = rng.randbytes(rng.randrange(0, 90))
        n = rng.randrange(1, 64)
        assert partition_for(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))


def test_producers_partition_keys_as_the_java_client() -> None:
    assert producer_config(KafkaSettings())["partitioner"] == "murmur2_random"
    # A user's own partitioner still wins (the router then takes the repartition hop, correctly).
    assert producer_config(KafkaSettings(extra={"partitioner": "consistent"}))["partitioner"] == "consistent"


def _req(content: str = "hello", **kw: Any) -> InferenceRequest:
    return InferenceRequest.model_validate(
        {"tenant": "acme", "messages": [ChatMessage(role="user", content=content)], **kw}
    )


def test_placement_key_is_the_dedupe_key_or_the_request_id() -> None:
    ps = ProcessorSettings()
    r = _req()
    assert placement_key(r, ps) == dedupe_key(r, ps) and placement_key(r, ps).startswith("content:acme:")
    assert placement_key(_req(idempotency_key="k1"), ps) == "idem:acme:k1"
    opted_out = _req(cache=False)
    assert placement_key(opted_out, ps) == opted_out.request_id
    off = ProcessorSettings(dedupe_enabled=False)
    assert placement_key(r, off) == r.request_id


def test_the_client_puts_copies_of_a_request_on_their_table_partition() -> None:
    broker = StubBroker()
    settings = Settings(publish_status=False)
    topic = Topics(settings.topic_prefix).requests("normal")
    broker.create_topic(topic, partitions=8)
    client = SluiceClient(settings, serde=SERDE, producer=broker.producer())
    ids = [client.submit(f"prompt {i % 5}", tenant="acme") for i in range(20)]
    client.flush()
    msgs = broker.messages(topic)
    assert {m.value() and SERDE.decode(InferenceRequest, m.value()).request_id for m in msgs} == set(ids)
    for m in msgs:
        request = SERDE.decode(InferenceRequest, m.value())
        key = dedupe_key(request, settings.processor)
        assert key is not None and m.key() == key.encode()
        assert m.partition() == partition_for(key.encode(), 8)
    # Copies of one prompt share one partition.
    by_prompt: dict[str, set[int]] = {}
    for m in msgs:
        text = SERDE.decode(InferenceRequest, m.value()).messages[0].content
        by_prompt.setdefault(text, set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_prompt.values())


def test_local_partitions_only_when_co_partitioned() -> None:
    assert Colocated.local_partitions(4, 4, [0, 2]) == {0, 2}
    assert Colocated.local_partitions(4, 6, [0, 2]) == frozenset()  # not co-partitioned
    assert Colocated.local_partitions(None, 4, [0]) == frozenset()  # metadata not known yet
    assert Colocated.local_partitions(4, 4, []) == frozenset()


def _routed(content: str, n: int) -> tuple[list[Out], int]:
    """The pipeline's output for a request, and the partition its dedupe key maps to."""
    pipe = RequestPipeline(CATALOG, TOPICS, SERDE, ProcessorSettings())
    outs = pipe.process(SERDE.encode(_req(content)), topic=TOPICS.requests("normal"), partition=0, offset=0)
    hop = next(o for o in outs if o.topic == TOPICS.dedupe)
    key = hop.key_bytes()
    assert key is not None
    return outs, partition_for(key, n)


def test_a_request_on_its_table_partition_is_settled_in_place_others_take_the_hop() -> None:
    table: dict[str, Any] = {}
    stage = DedupeStage(table, Emitter(TOPICS, SERDE, CATALOG), ProcessorSettings())
    colocated = Colocated(TOPICS.dedupe, stage, SERDE)
    outs, home = _routed("a question", 4)
    local_before = colocated.local_hits._value.get()
    hop_before = colocated.repartitioned._value.get()

    # On its partition, owned: forwarded to the model topic now, the entry written.
    settled = colocated.split(outs, home, 4, {home}, lambda o: colocated.on_request(o, home))
    assert not any(o.topic == TOPICS.dedupe for o in settled)
    assert any(o.topic == TOPICS.model("cheap", "normal") for o in settled)
    (entry,) = table.values()
    assert entry["p"] == home and entry["state"] == "running"

    # A copy on its partition again: attached to the first, nothing forwarded.
    copy, _ = _routed("a question", 4)
    attached = colocated.split(copy, home, 4, {home}, lambda o: colocated.on_request(o, home))
    assert not any(o.topic in (TOPICS.model("cheap", "normal"), TOPICS.dedupe) for o in attached)
    assert len(next(iter(table.values()))["waiters"]) == 1

    # Elsewhere, or on a partition not owned: the hop, unchanged.
    other = (home + 1) % 4
    moved = colocated.split(outs, other, 4, {0, 1, 2, 3}, lambda o: pytest.fail("settled away from home"))
    assert moved == outs
    unowned = colocated.split(outs, home, 4, set(), lambda o: pytest.fail("settled on a partition not owned"))
    assert unowned == outs
    assert colocated.local_hits._value.get() - local_before == 2
    assert colocated.repartitioned._value.get() - hop_before == 2
