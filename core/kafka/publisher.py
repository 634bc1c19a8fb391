"""Produce records and learn when every record of a unit of work is acknowledged.

A consumer may commit a source offset only once every record its work produced is on the broker
(``acks=all``). The publisher counts each unit's outstanding deliveries and calls ``on_done(unit)``
when the last one is acknowledged. A failed delivery is kept and raised by :meth:`poll` or
:meth:`flush` (the caller then stops without committing: a restart redoes the unit), unless the
unit was published with ``on_failed``, which turns the error into replacement records (a dead
letter: errors as data), produced under the same unit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message

from core.errors import BrokerError
from schemas import AvroRecord, Serde

__all__ = ["Failure", "LazyProducer", "Out", "OutHeaders", "Producer", "TrackedPublisher", "produce"]

logger = logging.getLogger(__name__)

OutHeaders = Sequence[tuple[str, str | bytes | None]]
OnDelivery = Callable[[KafkaError | None, Message], None]


@dataclass(frozen=True)
class Out:
    """One record to publish: a Sluice record (encoded by the publisher's serde) or bytes already
    encoded (a copy of a consumed message). Every stage, router and consumers alike, says what it
    sends in this one shape."""

    topic: str
    key: str | bytes | None
    record: AvroRecord | bytes
    headers: OutHeaders = field(default_factory=list)
    # Unset: the producer's partitioner picks one.
    partition: int | None = None
    # The record's bytes when the sender already holds them (a router forwarding the request it
    # consumed): sent as they are, not encoded a second time.
    encoded: bytes | None = None

    def value(self, serde: Serde) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return self.record if isinstance(self.record, bytes) else serde.encode(self.record)

    def key_bytes(self) -> bytes | None:
        return self.key.encode() if isinstance(self.key, str) else self.key


class Producer(Protocol):
    """The part of ``confluent_kafka.Producer`` the runtime uses (the stub broker has one too)."""

    def produce(
        self,
        topic: str,
        value: Any = ...,
        key: Any = ...,
        headers: Any = ...,
        partition: int = ...,
        on_delivery: Any = ...,
    ) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


class LazyProducer:
    """A producer made on its first record (like Quix Streams' lazy clients): a worker that rarely
    produces (a sink's dead letters) holds no connection, and logs nothing when the broker goes
    away before it."""

    def __init__(self, factory: Callable[[], Producer]) -> None:
        self._factory = factory
        self._producer: Producer | None = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    def open(self) -> Producer:
        if self._producer is None:
            self._producer = self._factory()
        return self._producer

    def produce(self, topic: str, **kw: Any) -> None:
        self.open().produce(topic, **kw)

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout) if self._producer is not None else 0

    def flush(self, timeout: float = 0) -> int:
        return self._producer.flush(timeout) if self._producer is not None else 0


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None = None,
    headers: OutHeaders | None = None,
    partition: int | None = None,
    on_delivery: OnDelivery | None = None,
) -> None:
    """``producer.produce`` that waits out a full local queue (serving delivery reports to make
    room) instead of failing; other errors raise ``KafkaException`` as they do."""
    kw: dict[str, Any] = {"value": value, "key": key, "headers": headers, "on_delivery": on_delivery}
    if partition is not None:
        kw["partition"] = partition
    while True:
        try:
            producer.produce(topic, **kw)
            return
        except BufferError:
            producer.poll(0.05)


def _key(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


@dataclass(frozen=True)
class Failure:
    """A record the broker did not acknowledge, and the unit it belonged to."""

    unit: Hashable
    error: str


class TrackedPublisher:
    """Thread-safe: several threads may publish (the gateway's request handlers) while another
    serves delivery reports."""

    def __init__(self, producer: Producer, serde: Serde, on_done: Callable[[Any], None] | None = None) -> None:
        self.producer = producer
        self.serde = serde
        self.on_done = on_done
        self._lock = threading.Lock()
        self._outstanding: dict[Hashable, int] = {}
        self._handlers: dict[Hashable, Callable[[str], Sequence[Out]]] = {}
        self._failed: list[Failure] = []
        self.errors: list[Failure] = []

    @property
    def outstanding(self) -> int:
        """Units whose records are not all acknowledged yet."""
        return len(self._outstanding)

    def encode(self, out: Out) -> bytes:
        return out.value(self.serde)

    def publish(
        self, unit: Hashable, outs: Sequence[Out], *, on_failed: Callable[[str], Sequence[Out]] | None = None
    ) -> None:
        """Produce ``outs`` for ``unit``; it is done once all are acknowledged (at once if none).
        ``on_failed(error)`` turns a failed delivery into replacement records (a dead letter);
        without it a failure is raised by the next :meth:`poll` or :meth:`flush`."""
        if not outs:
            self._finish(unit)
            return
        encoded = [(out, self.encode(out)) for out in outs]  # a record that cannot encode raises here
        with self._lock:
            self._outstanding[unit] = self._outstanding.get(unit, 0) + len(outs)
            if on_failed is not None:
                self._handlers[unit] = on_failed
        for out, value in encoded:
            self._produce(unit, out, value)

    def advisory(self, outs: Sequence[Out]) -> None:
        """Records nothing waits for (a ``running`` status): a lost one costs no correctness."""
        for out in outs:
            try:
                produce(self.producer, out.topic, self.encode(out), _key(out.key), out.headers, out.partition)
            except KafkaException as exc:
                logger.warning("advisory record to %s not produced: %s", out.topic, exc)

    def _produce(self, unit: Hashable, out: Out, value: bytes | None = None, *, replaceable: bool = True) -> None:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            self._delivered(unit, out.topic, None if err is None else err.str(), replaceable)

        if value is None:
            value = self.encode(out)
        try:
            produce(self.producer, out.topic, value, _key(out.key), out.headers, out.partition, delivered)
        except KafkaException as exc:
            # Refused before it was queued (an unknown topic, a record over the size limit).
            self._delivered(unit, out.topic, str(exc.args[0] if exc.args else exc), replaceable)

    def _delivered(self, unit: Hashable, topic: str, error: str | None, replaceable: bool = True) -> None:
        with self._lock:
            if error is not None:
                if replaceable and unit in self._handlers:
                    # Replaced by the handler's records on the next poll (not produced from inside
                    # a delivery callback); the unit stays outstanding until those are acknowledged.
                    self._failed.append(Failure(unit, f"{topic}: {error}"))
                else:
                    # No handler, or its replacement failed too: raised, nothing committed.
                    self.errors.append(Failure(unit, f"{topic}: {error}"))
                return
            if unit not in self._outstanding:
                return  # not counted here (a transaction's records: settled by its commit)
            left = self._outstanding[unit] - 1
            if left > 0:
                self._outstanding[unit] = left
                return
            del self._outstanding[unit]
            self._handlers.pop(unit, None)
        self._finish(unit)

    def _finish(self, unit: Hashable) -> None:
        if self.on_done is not None:
            self.on_done(unit)

    def _replace_failed(self) -> bool:
        with self._lock:
            failed, self._failed = self._failed, []
            work = [(f.unit, self._handlers[f.unit], f.error) for f in failed]
        for unit, handler, error in work:
            replacement = list(handler(error))
            with self._lock:
                # The failed record is settled by its replacement records (if any).
                self._outstanding[unit] = self._outstanding.get(unit, 0) + len(replacement)
            for out in replacement:
                self._produce(unit, out, replaceable=False)
            self._delivered(unit, "", None)
        return bool(work)

    def poll(self) -> None:
        self.producer.poll(0)
        self._replace_failed()
        self.raise_on_error()

    def flush(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
            if not self._replace_failed() or time.monotonic() >= deadline:
                break
        if remaining:
            with self._lock:
                self.errors.append(Failure(None, f"{remaining} record(s) unacknowledged after {timeout}s"))
        self.raise_on_error()

    def take_errors(self) -> list[Failure]:
        with self._lock:
            errors, self.errors = self.errors, []
        return errors

    def raise_on_error(self) -> None:
        if self.errors:
            # Not committing is the safe outcome: the unit is redone after a restart.
            errors = self.take_errors()
            raise BrokerError(f"{len(errors)} record(s) not acknowledged: {'; '.join(f.error for f in errors[:3])}")
