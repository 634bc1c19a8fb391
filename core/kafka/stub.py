"""TEST DOUBLE: an in-memory broker (after dramatiq's ``StubBroker``), so each worker's logic is
unit-tested without Kafka. Topics with partitions, keyed partitioning, consumers in groups with
committed offsets, pause/resume/seek, rebalances on demand, producers whose deliveries are
acknowledged when polled (or refused, per topic). Not a Kafka: no replication, no timing."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from core.kafka.coords import TP
from core.placement import partition_for

__all__ = ["StubBroker", "StubConsumer", "StubMessage", "StubProducer", "StubShareConsumer"]


@dataclass
class StubMessage:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None = None
    _headers: list[tuple[str, bytes]] | None = None
    _timestamp_ms: int = 1_700_000_000_000
    _error: KafkaError | None = None
    _deliveries: int | None = None

    def delivery_count(self) -> int | None:
        return self._deliveries

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp_ms)  # TIMESTAMP_CREATE_TIME

    def error(self) -> KafkaError | None:
        return self._error


@dataclass
class _Meta:
    partitions: dict[int, object]
    error: object = None


@dataclass
class _ClusterMeta:
    topics: dict[str, _Meta]


@dataclass
class _ShareRecord:
    state: str = "available"  # available | acquired | archived
    deliveries: int = 0
    owner: object = None


@dataclass
class StubBroker:
    topics: dict[str, list[list[StubMessage]]] = field(default_factory=dict)
    committed: dict[str, dict[TP, int]] = field(default_factory=dict)
    # Topics whose deliveries fail (name -> the error the delivery report carries).
    refuse: dict[str, KafkaError] = field(default_factory=dict)
    _members: dict[str, list[StubConsumer]] = field(default_factory=dict)
    share_state: dict[str, dict[tuple[str, int, int], _ShareRecord]] = field(default_factory=dict)
    # A share group's share.delivery.count.limit.
    delivery_limit: int = 5

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self.topics.setdefault(name, [[] for _ in range(partitions)])

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> StubMessage:
        parts = self.topics[topic]
        if partition is None or partition < 0:
            partition = partition_for(key, len(parts)) if key is not None else 0
        log = parts[partition]
        msg = StubMessage(topic, partition, len(log), value, key, list(headers or []))
        log.append(msg)
        return msg

    def messages(self, topic: str) -> list[StubMessage]:
        return [m for part in self.topics.get(topic, []) for m in part]

    def producer(self) -> StubProducer:
        return StubProducer(self)

    def consumer(self, group: str) -> StubConsumer:
        return StubConsumer(self, group)

    def share_consumer(self, group: str, max_poll_records: int = 500) -> StubShareConsumer:
        return StubShareConsumer(self, group, max_poll_records)

    # -- share groups: per record, who holds it and how often it was delivered -----------------
    def _share(self, group: str) -> dict[tuple[str, int, int], _ShareRecord]:
        return self.share_state.setdefault(group, {})

    def expire_locks(self, group: str) -> int:
        """Every held record's lock runs out now (its consumer died or stalled): back to the
        group, or archived once delivered ``delivery_limit`` times. Returns how many."""
        n = 0
        for rec in self._share(group).values():
            if rec.state == "acquired":
                rec.owner = None
                rec.state = "archived" if rec.deliveries >= self.delivery_limit else "available"
                n += 1
        return n

    def _join(self, member: StubConsumer) -> None:
        members = self._members.setdefault(member.group, [])
        members.append(member)
        self._rebalance(member.group)

    def _leave(self, member: StubConsumer) -> None:
        members = self._members.get(member.group, [])
        if member in members:
            members.remove(member)
            member._set_assignment(set())
            self._rebalance(member.group)

    def _rebalance(self, group: str) -> None:
        """Range-like assignment over the group's live members, applied cooperatively (each member
        is told what it loses and what it gains on its next consume)."""
        members = self._members.get(group, [])
        if not members:
            return
        wanted = sorted({tp for m in members for tp in m._wanted()})
        share: dict[int, set[TP]] = {id(m): set() for m in members}
        for i, tp in enumerate(wanted):
            share[id(members[i % len(members)])].add(tp)
        for m in members:
            m._set_assignment(share[id(m)])

    def rebalance(self, group: str) -> None:
        """Re-run the group's assignment (after members joined or left)."""
        self._rebalance(group)


class StubProducer:
    def __init__(self, broker: StubBroker) -> None:
        self.broker = broker
        self._reports: list[tuple[Callable[..., None], KafkaError | None, StubMessage]] = []
        self.produced = 0
        # While set, delivery reports wait (a slow broker): poll serves none, flush times out.
        self.holding = False

    def produce(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        headers: Any = None,
        partition: int = -1,
        on_delivery: Any = None,
    ) -> None:
        if topic not in self.broker.topics:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, f"unknown topic {topic}"))
        err = self.broker.refuse.get(topic)
        if err is None:
            msg = self.broker.append(topic, value, key, partition, headers)
            self.produced += 1
        else:
            msg = StubMessage(topic, max(partition, 0), -1, value, key, headers)
        if on_delivery is not None:
            self._reports.append((on_delivery, err, msg))

    def poll(self, timeout: float = 0) -> int:
        if self.holding:
            return 0
        reports, self._reports = self._reports, []
        for callback, err, msg in reports:
            callback(err, msg)
        return len(reports)

    def flush(self, timeout: float = 0) -> int:
        if self.holding:
            return len(self._reports)
        while self._reports:
            self.poll()
        return 0


class StubConsumer:
    def __init__(self, broker: StubBroker, group: str) -> None:
        self.broker = broker
        self.group = group
        self.assignment_set: set[TP] = set()
        self.paused: set[TP] = set()
        self.positions: dict[TP, int] = {}
        self.closed = False
        self._subscription: list[str] = []
        self._callbacks: dict[str, Callable[..., None] | None] = {}
        self._target: set[TP] = set()
        self._assigned_manually = False

    # -- group membership -------------------------------------------------------------------------
    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self._subscription = list(topics)
        self._callbacks = {"assign": on_assign, "revoke": on_revoke}
        self.broker._join(self)

    def _wanted(self) -> list[TP]:
        return [(t, p) for t in self._subscription for p in range(len(self.broker.topics.get(t, [])))]

    def _set_assignment(self, tps: set[TP]) -> None:
        self._target = set(tps)

    def _serve_rebalance(self) -> None:
        """Apply the broker's latest assignment: revoke what goes (callback first), then assign
        what comes, from the group's committed offsets."""
        gone = self.assignment_set - self._target
        if gone:
            if self._callbacks.get("revoke"):
                self._callbacks["revoke"](self, [TopicPartition(t, p) for t, p in sorted(gone)])  # type: ignore[misc]
            self.assignment_set -= gone
            self.paused -= gone
            for tp in gone:
                self.positions.pop(tp, None)
        new = self._target - self.assignment_set
        if new:
            committed = self.broker.committed.setdefault(self.group, {})
            for tp in new:
                self.positions[tp] = committed.get(tp, 0)
            self.assignment_set |= new
            if self._callbacks.get("assign"):
                self._callbacks["assign"](self, [TopicPartition(t, p) for t, p in sorted(new)])  # type: ignore[misc]

    def assign(self, parts: list[TopicPartition]) -> None:
        self._assigned_manually = True
        for p in parts:
            tp = (p.topic, p.partition)
            self.assignment_set.add(tp)
            self.positions[tp] = max(p.offset, 0)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self.assignment_set)]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> _ClusterMeta:
        names = [topic] if topic is not None else list(self.broker.topics)
        return _ClusterMeta({n: _Meta({i: object() for i in range(len(self.broker.topics.get(n, [])))}) for n in names})

    def get_watermark_offsets(self, part: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        return 0, len(self.broker.topics[part.topic][part.partition])

    # -- fetching -------------------------------------------------------------------------------
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[StubMessage]:
        if not self._assigned_manually:
            self._serve_rebalance()
        out: list[StubMessage] = []
        queue: deque[TP] = deque(sorted(self.assignment_set - self.paused))
        while queue and len(out) < num_messages:
            tp = queue.popleft()
            log = self.broker.topics[tp[0]][tp[1]]
            pos = self.positions.get(tp, 0)
            if pos < len(log):
                out.append(log[pos])
                self.positions[tp] = pos + 1
                queue.append(tp)
        return out

    def poll(self, timeout: float = -1) -> StubMessage | None:
        msgs = self.consume(1, timeout)
        return msgs[0] if msgs else None

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in parts}

    def resume(self, parts: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in parts}

    def seek(self, part: TopicPartition) -> None:
        tp = (part.topic, part.partition)
        if tp not in self.assignment_set:
            raise KafkaException(KafkaError(KafkaError._STATE, f"{tp} is not assigned"))
        self.positions[tp] = part.offset

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        committed = self.broker.committed.setdefault(self.group, {})
        for p in offsets or []:
            committed[(p.topic, p.partition)] = p.offset

    def consumer_group_metadata(self) -> str:
        return self.group

    def crash(self) -> None:
        """Die without a word (kill -9): no revocation, no commit; the group rebalances as if the
        session timed out."""
        self.closed = True
        members = self.broker._members.get(self.group, [])
        if self in members:
            members.remove(self)
            self.broker._rebalance(self.group)

    def close(self) -> None:
        if not self.closed and not self._assigned_manually:
            self.closed = True
            self.broker._leave(self)
            self._serve_rebalance()
        self.closed = True


class StubShareConsumer:
    """A share group member in explicit acknowledgement mode: acquires available records of its
    topics (up to ``max_poll_records`` a poll), acknowledges them one by one (ACCEPT and REJECT
    archive, RELEASE makes them available again), refuses to poll while the last poll's records
    are not all acknowledged, and releases what it holds when closed."""

    def __init__(self, broker: StubBroker, group: str, max_poll_records: int) -> None:
        self.broker = broker
        self.group = group
        self.max_poll_records = max_poll_records
        self.topics: list[str] = []
        self._unacked: set[tuple[str, int, int]] = set()
        self._acks: dict[tuple[str, int, int], int] = {}
        self.closed = False

    def subscribe(self, topics: list[str]) -> None:
        self.topics = list(topics)

    def poll(self, timeout: float = -1) -> list[StubMessage]:
        if self._unacked:
            raise KafkaException(
                KafkaError(KafkaError._STATE, "records from the previous poll have not been acknowledged")
            )
        state = self.broker._share(self.group)
        out: list[StubMessage] = []
        for topic in self.topics:
            for log in self.broker.topics.get(topic, []):
                for msg in log:
                    if len(out) >= self.max_poll_records:
                        break
                    key = (msg.topic(), msg.partition(), msg.offset())
                    rec = state.setdefault(key, _ShareRecord())
                    if rec.state != "available":
                        continue
                    rec.state, rec.owner = "acquired", self
                    rec.deliveries += 1
                    self._unacked.add(key)
                    out.append(
                        StubMessage(
                            msg._topic,
                            msg._partition,
                            msg._offset,
                            msg._value,
                            msg._key,
                            msg._headers,
                            msg._timestamp_ms,
                            None,
                            rec.deliveries,
                        )
                    )
        return out

    def acknowledge_offset(self, topic: str, partition: int, offset: int, ack_type: Any = 1) -> None:
        key = (topic, partition, offset)
        if key not in self._unacked:
            raise KafkaException(KafkaError(KafkaError._STATE, f"{key} is not in flight"))
        self._unacked.discard(key)
        self._acks[key] = int(ack_type)

    def acknowledge(self, msg: StubMessage, ack_type: Any = 1) -> None:
        self.acknowledge_offset(msg.topic(), msg.partition(), msg.offset(), ack_type)

    def _send(self) -> None:
        from confluent_kafka import AcknowledgeType

        state = self.broker._share(self.group)
        for key, kind in self._acks.items():
            rec = state[key]
            if rec.owner is not self:
                continue  # its lock ran out meanwhile
            rec.owner = None
            if kind == int(AcknowledgeType.RELEASE):
                rec.state = "archived" if rec.deliveries >= self.broker.delivery_limit else "available"
            else:
                rec.state = "archived"
        self._acks = {}

    def commit_async(self) -> None:
        self._send()

    def commit_sync(self, timeout: float = 60) -> dict[Any, Any]:
        self._send()
        return {}

    def close(self) -> None:
        if self.closed:
            return
        self._send()
        state = self.broker._share(self.group)
        for key in self._unacked:
            rec = state[key]
            if rec.owner is self:
                rec.owner, rec.state = None, "available"
        self._unacked.clear()
        self.closed = True
