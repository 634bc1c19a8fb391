"""The router's librdkafka sender: ``settle`` (called before every offset commit) returns only once
every record produced before it is acknowledged, and raises when one was not delivered."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from core.errors import BrokerError
from core.kafka.stub import StubBroker, StubProducer
from stream_processors.sender import KafkaSender


class _Msg:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic


class ReorderingProducer:
    """Delivers the reports it holds in the order a test says (another partition's batch first),
    or not at all until told."""

    def __init__(self) -> None:
        self.reports: list[tuple[Any, str]] = []
        self.order: list[int] | None = None
        self.fail: set[int] = set()

    def produce(self, topic: str, **kw: Any) -> None:
        self.reports.append((kw["on_delivery"], topic))

    def poll(self, timeout: float = 0) -> int:
        if self.order is None:
            return 0
        served = 0
        for i in self.order:
            callback, topic = self.reports[i]
            err = KafkaError(KafkaError._MSG_TIMED_OUT) if i in self.fail else None
            callback(err, _Msg(topic))
            served += 1
        self.order = []
        return served

    def flush(self, timeout: float = 0) -> int:
        return 0


def test_settle_waits_for_every_record_produced_before_it() -> None:
    producer = ReorderingProducer()
    sender = KafkaSender(producer)  # type: ignore[arg-type]
    for i in range(3):
        sender.send("t", b"k", b"v%d" % i, [])
    # Records 1 and 2 acknowledged, 0 not yet: not settled.
    producer.order = [2, 1]
    with pytest.raises(BrokerError, match="not acknowledged"):
        sender.settle(timeout=0.2)
    assert sender.outstanding() == 3
    producer.order = [0]
    sender.settle(timeout=1)
    assert sender.outstanding() == 0


def test_a_record_not_delivered_makes_settle_raise() -> None:
    producer = ReorderingProducer()
    sender = KafkaSender(producer)  # type: ignore[arg-type]
    sender.send("t", None, b"a", [])
    sender.send("u", None, b"b", [])
    producer.fail = {1}
    producer.order = [0, 1]
    with pytest.raises(BrokerError, match="u: "):
        sender.settle(timeout=1)


def test_records_reach_the_broker_with_their_keys_headers_and_partitions() -> None:
    broker = StubBroker()
    broker.create_topic("t", partitions=4)
    sender = KafkaSender(StubProducer(broker))
    sender.send("t", b"key", b"one", [("h", b"1")])
    sender.send("t", b"key", b"two", [], partition=3)
    sender.settle(timeout=1)
    msgs = broker.messages("t")
    assert sorted(m.value() for m in msgs) == [b"one", b"two"]
    assert next(m for m in msgs if m.value() == b"two").partition() == 3
    assert next(m for m in msgs if m.value() == b"one").headers() == [("h", b"1")]
    # Nothing produced since: settles at once.
    sender.settle(timeout=0)
