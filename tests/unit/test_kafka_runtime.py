"""The Kafka runtime (``core.kafka``) on its stub broker: at least once is stated and tested here,
once, for every worker built on it. A message's position is committed only when its work is done
(its records acknowledged), in log order, whatever order the work finishes in; a failed delivery
commits nothing unless the handler turns it into a dead letter; a rebalance commits what the
leaving owner finished and the next owner starts there; end-of-partition events never reach a
handler."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, Message

from core.errors import BrokerError
from core.kafka import ConsumeLoop, Handler, OffsetTracker, Out, TopicReader, TrackedPublisher
from core.kafka.publisher import produce
from core.kafka.stub import StubBroker, StubMessage
from schemas import Serde

SERDE = Serde()


def test_offsets_commit_only_below_the_lowest_pending() -> None:
    t = OffsetTracker()
    for off in (5, 6, 7):
        t.taken(("a", 0), off)
    t.done(("a", 0), 6)
    t.done(("a", 0), 7)
    assert t.committable() == {("a", 0): 5}
    t.mark_committed({("a", 0): 5})
    assert t.committable() == {}
    t.done(("a", 0), 5)
    assert t.committable() == {("a", 0): 8}
    assert t.committable(only={("b", 0)}) == {}


class Copier(Handler):
    """Copies each message to ``out``, holding back the ones it is told to (slow work)."""

    def __init__(self, hold: set[bytes] | None = None) -> None:
        self.hold = hold or set()
        self.held: list[Message] = []
        self.seen: list[bytes] = []
        self.revoked: list[set[tuple[str, int]]] = []

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        value = msg.value() or b""
        self.seen.append(value)
        if value in self.hold:
            self.held.append(msg)
            return
        self.copy(loop, msg)

    def copy(self, loop: ConsumeLoop, msg: Message) -> None:
        assert loop.publisher is not None
        loop.publisher.publish(
            ((msg.topic(), msg.partition()), msg.offset()), [Out("out", msg.key(), msg.value() or b"")]
        )

    def on_revoke(self, loop: ConsumeLoop, tps: set[tuple[str, int]]) -> None:
        self.revoked.append(tps)


def _setup(partitions: int = 1) -> StubBroker:
    broker = StubBroker()
    broker.create_topic("in", partitions)
    broker.create_topic("out")
    return broker


def _loop(broker: StubBroker, handler: Handler, group: str = "g") -> ConsumeLoop:
    return ConsumeLoop(handler, broker.consumer(group), ["in"], publisher=TrackedPublisher(broker.producer(), SERDE))


def _committed(broker: StubBroker, group: str = "g", tp: tuple[str, int] = ("in", 0)) -> int:
    return broker.committed.get(group, {}).get(tp, 0)


def test_a_position_is_committed_only_once_the_work_before_it_is_acknowledged() -> None:
    broker = _setup()
    for i in range(5):
        broker.append("in", f"m{i}".encode())
    handler = Copier(hold={b"m1"})
    producer = broker.producer()
    producer.holding = True  # the broker has not acknowledged anything yet
    loop = ConsumeLoop(handler, broker.consumer("g"), ["in"], publisher=TrackedPublisher(producer, SERDE))
    loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert _committed(broker) == 0
    producer.holding = False
    loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    # m2..m4 are acknowledged, but m1's work is not done: the position stays at m1.
    assert _committed(broker) == 1
    handler.copy(loop, handler.held.pop())
    loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert _committed(broker) == 5
    assert sorted(m.value() for m in broker.messages("out")) == [f"m{i}".encode() for i in range(5)]


def test_a_crash_redoes_exactly_the_work_not_done() -> None:
    broker = _setup()
    for i in range(4):
        broker.append("in", f"m{i}".encode())
    loop = _loop(broker, Copier(hold={b"m2"}))
    loop.run_once(wait=0)
    loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    # The process dies here (no finish, no close). A new consumer of the group resumes at m2.
    loop.consumer.crash()
    survivor = Copier()
    again = _loop(broker, survivor)
    again.run_once(wait=0)
    assert survivor.seen == [b"m2", b"m3"]  # m3 again: at least once, never m2 lost


def test_a_failed_delivery_commits_nothing_and_is_raised() -> None:
    broker = _setup()
    broker.append("in", b"m0")
    broker.refuse["out"] = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")
    loop = _loop(broker, Copier())
    with pytest.raises(BrokerError, match="too large"):
        loop.run_once(wait=0)
        loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert _committed(broker) == 0


def test_a_failed_delivery_with_a_handler_becomes_its_replacement_records() -> None:
    broker = _setup()
    broker.create_topic("dlq")
    broker.append("in", b"m0")
    broker.refuse["out"] = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not allowed")
    broker.producer()
    publisher = TrackedPublisher(broker.producer(), SERDE)

    class DeadLettering(Handler):
        def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
            unit = (("in", 0), msg.offset())
            publisher.publish(unit, [Out("out", None, b"copy")], on_failed=lambda e: [Out("dlq", None, e.encode())])

    loop = ConsumeLoop(DeadLettering(), broker.consumer("g"), ["in"], publisher=publisher)
    for _ in range(3):
        loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert [m.value() for m in broker.messages("dlq")] == [b"out: not allowed"]
    assert _committed(broker) == 1


def test_a_rebalance_commits_what_the_leaving_owner_finished_and_the_next_starts_there() -> None:
    broker = _setup(partitions=2)
    for i in range(6):
        broker.append("in", f"m{i}".encode(), partition=i % 2)
    first = Copier(hold={b"m3"})  # partition 1: m1 done, m3 held, m5 done
    loop1 = _loop(broker, first)
    loop1.run_once(wait=0)
    second = Copier()
    loop2 = _loop(broker, second)
    loop2.start()  # joins: the broker moves one partition to it
    loop1.run_once(wait=0)  # the revocation is served on the next fetch
    assert first.revoked == [{("in", 1)}]
    assert _committed(broker, tp=("in", 1)) == 1  # up to m3, the held one
    loop2.run_once(wait=0)
    assert second.seen == [b"m3", b"m5"]
    assert loop1.assigned == {("in", 0)} and loop2.assigned == {("in", 1)}


class Recorder(Handler):
    def __init__(self) -> None:
        self.values: list[bytes | None] = []

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        self.values.append(msg.value())
        loop.done((msg.topic(), msg.partition()), msg.offset())


def test_end_of_partition_events_never_reach_the_handler_and_fatal_errors_raise() -> None:
    broker = _setup()
    broker.append("in", b"m0")
    log = broker.topics["in"][0]
    eof = StubMessage("in", 0, 1, None, _error=KafkaError(KafkaError._PARTITION_EOF))
    log.append(eof)
    handler = Recorder()
    loop = ConsumeLoop(handler, broker.consumer("g"), ["in"])
    loop.run_once(wait=0)
    assert handler.values == [b"m0"]
    log.append(StubMessage("in", 0, 2, None, _error=KafkaError(KafkaError._FATAL, "fenced", fatal=True)))
    with pytest.raises(BrokerError, match="fatal"):
        loop.run_once(wait=0)


def test_a_reader_without_a_group_commits_nothing() -> None:
    broker = _setup()
    broker.append("in", b"m0")
    loop = ConsumeLoop(Recorder(), broker.consumer("follow"), ["in"], commit=False)
    loop.run_once(wait=0)
    loop.finish()
    assert "follow" not in broker.committed or broker.committed["follow"] == {}


def test_a_full_local_queue_is_waited_out() -> None:
    class FullOnce:
        def __init__(self) -> None:
            self.calls = 0
            self.polls = 0

        def produce(self, topic: str, **kw: Any) -> None:
            self.calls += 1
            if self.calls == 1:
                raise BufferError("Local: Queue full")

        def poll(self, timeout: float = 0) -> int:
            self.polls += 1
            return 0

        def flush(self, timeout: float = 0) -> int:
            return 0

    p = FullOnce()
    produce(p, "t", b"v")  # type: ignore[arg-type]
    assert p.calls == 2 and p.polls == 1


def test_the_topic_reader_reads_every_partition_from_the_beginning() -> None:
    broker = _setup(partitions=3)
    for i in range(6):
        broker.append("in", f"m{i}".encode(), partition=i % 3)
    reader = TopicReader(broker.consumer("unused"), ["in"])
    assert sorted(m.value() for m in reader.take()) == [f"m{i}".encode() for i in range(6)]
    assert list(reader.take()) == []
    broker.append("in", b"later", partition=1)
    assert [m.value() for m in reader.take()] == [b"later"]
