"""Produce a request's records and learn when all of them are acknowledged.

The consumer may commit a source offset only once every record its request produced is on the
broker (``acks=all``). The publisher counts each request's outstanding deliveries and calls
``on_done(tp, offset)`` when the last one is acknowledged; a delivery error is kept, and the
consumer then stops without committing (a restart re-runs the request; results are keyed by
request id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message

from core.errors import BrokerError
from gpu_consumers.outcomes import Out
from schemas import Serde

__all__ = ["Producer", "Publisher"]

logger = logging.getLogger(__name__)

TP = tuple[str, int]


class Producer(Protocol):
    """The part of ``confluent_kafka.Producer`` the publisher uses (tests pass an in-memory one)."""

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


class Publisher:
    def __init__(self, producer: Producer, serde: Serde, on_done: Callable[[TP, int], None]) -> None:
        self.producer = producer
        self.serde = serde
        self.on_done = on_done
        self._outstanding: dict[tuple[TP, int], int] = {}
        self.errors: list[str] = []

    @property
    def outstanding(self) -> int:
        """Source messages whose records are not all acknowledged yet."""
        return len(self._outstanding)

    def publish(self, tp: TP, offset: int, outs: Sequence[Out]) -> None:
        """Produce ``outs`` for the source message at (tp, offset); it is done when all are acked."""
        token = (tp, offset)
        if not outs:
            self.on_done(tp, offset)
            return
        self._outstanding[token] = self._outstanding.get(token, 0) + len(outs)
        for out in outs:
            self._produce(out, self._callback(token))

    def _callback(self, token: tuple[TP, int]) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            self._delivered(token, err, msg)

        return delivered

    def advisory(self, outs: Sequence[Out]) -> None:
        """Records nothing waits for (a ``running`` status): a lost one costs no correctness."""
        for out in outs:
            self._produce(out, None)

    def _produce(self, out: Out, callback: Callable[[KafkaError | None, Message], None] | None) -> None:
        value = self.serde.encode(out.record)
        key = out.key.encode() if out.key is not None else None
        while True:
            try:
                if out.partition is None:
                    self.producer.produce(out.topic, value=value, key=key, headers=out.headers, on_delivery=callback)
                else:
                    self.producer.produce(
                        out.topic,
                        value=value,
                        key=key,
                        headers=out.headers,
                        partition=out.partition,
                        on_delivery=callback,
                    )
                return
            except BufferError:
                # Local queue full: serve delivery reports to make room.
                self.producer.poll(0.05)

    def _delivered(self, token: tuple[TP, int], err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")
            return
        left = self._outstanding.get(token, 0) - 1
        if left > 0:
            self._outstanding[token] = left
            return
        self._outstanding.pop(token, None)
        self.on_done(*token)

    def poll(self) -> None:
        self.producer.poll(0)
        self.raise_on_error()

    def flush(self, timeout: float = 60.0) -> None:
        remaining = self.producer.flush(timeout)
        if remaining:
            self.errors.append(f"{remaining} record(s) unacknowledged after {timeout}s")
        self.raise_on_error()

    def raise_on_error(self) -> None:
        if self.errors:
            errors, self.errors = self.errors, []
            # Not committing is the safe outcome: the request is re-run after a restart.
            raise BrokerError(f"results not acknowledged: {errors[:3]}")
