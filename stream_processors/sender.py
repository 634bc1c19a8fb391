"""The router's records go out through a librdkafka producer, and offsets wait for them.

Faust's own producer is aiokafka, pure Python: a send costs an asyncio future, a Faust channel
hop and Python batch building, and in the profile of the router that was the largest share of its
CPU after the event loop itself. The agents now hand their records to a confluent-kafka producer
(from the one client factory: ``acks=all``, idempotence, Kafka's partitioner), which batches and
encodes in C.

At-least-once stays as strong: Faust commits a source offset only after the event is handled,
and before every commit the consumer calls :meth:`KafkaSender.settle`, which returns once every
record produced so far is acknowledged. A record that cannot be delivered (librdkafka has already
retried it for ``delivery.timeout.ms``) makes ``settle`` raise; the worker then stops without
committing, so what was not delivered is handled again after the restart.

Table changelogs stay on Faust's producer (Faust flushes it before the commit too).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError

from core.errors import BrokerError
from core.kafka import LazyProducer, Producer
from core.kafka.publisher import OutHeaders, produce

__all__ = ["KafkaSender"]

logger = logging.getLogger(__name__)

# Delivery reports are served this often (per records produced) between commits, so the record of
# outstanding sends stays short.
_POLL_EVERY = 512


class KafkaSender:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._lock = threading.Lock()
        self._next = 0
        # Sequence numbers produced and not yet known delivered, in produce order; ``_delivered``
        # holds those acknowledged out of order (another partition's batch went first).
        self._pending: deque[int] = deque()
        self._delivered: set[int] = set()
        self._errors: list[str] = []

    def open(self) -> None:
        """Make a lazy producer now (a configuration error raises here, not on the first record)."""
        if isinstance(self.producer, LazyProducer):
            self.producer.open()

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: OutHeaders, partition: int | None = None
    ) -> None:
        with self._lock:
            seq = self._next
            self._next += 1
            self._pending.append(seq)
        produce(self.producer, topic, value, key, headers, partition, functools.partial(self._on_delivery, seq))
        if seq % _POLL_EVERY == 0:
            self.producer.poll(0)

    def _on_delivery(self, seq: int, err: KafkaError | None, msg: Any) -> None:
        with self._lock:
            if err is not None:
                self._errors.append(f"{msg.topic()}: {err}")
            self._delivered.add(seq)
            while self._pending and self._pending[0] in self._delivered:
                self._delivered.discard(self._pending.popleft())

    def settle(self, timeout: float = 300.0) -> None:
        """Return once every record produced before this call is acknowledged; raise
        :class:`BrokerError` if one failed or ``timeout`` passed first. Blocks: call it off the
        event loop."""
        with self._lock:
            upto = self._next
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._errors:
                    raise BrokerError(f"records not delivered: {'; '.join(self._errors[:3])}")
                if not self._pending or self._pending[0] >= upto:
                    return
            if time.monotonic() > deadline:
                raise BrokerError(f"records not acknowledged within {timeout:.0f} s")
            self.producer.poll(0.05)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)
