"""Exactly-once output on Apache Kafka, opt-in (``SLUICE_KAFKA__TRANSACTIONAL=true``).

One transactional producer per consumer process (KIP-447: fenced by the consumer group's
metadata, so the transactional id need not be tied to partitions). The records of units that
finished since the last commit and the source offsets they allow are committed together in one
short transaction after the work, every commit interval; no transaction is ever held open around
the work itself (a long transaction stalls every ``read_committed`` reader and runs into
``transaction.timeout.ms``). A crash aborts the open transaction: its units are redone and
``read_committed`` subscribers never see the first try. Units are ``((topic, partition), offset)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from confluent_kafka import KafkaException, TopicPartition

from core.errors import BrokerError
from core.kafka.coords import TP
from core.kafka.offsets import OffsetTracker
from core.kafka.publisher import Out, Producer, TrackedPublisher
from schemas import Serde

__all__ = ["TransactionalPublisher"]

logger = logging.getLogger(__name__)


class TransactionalPublisher(TrackedPublisher):
    def __init__(self, producer: Producer, serde: Serde, on_done: Callable[[Any], None] | None = None) -> None:
        super().__init__(producer, serde, on_done)
        self._pending: list[tuple[tuple[TP, int], Sequence[Out]]] = []
        self._advisory: list[Out] = []
        self._tx: Any = cast(Any, producer)  # the transactional calls of confluent_kafka.Producer
        try:
            self._tx.init_transactions(30)
        except KafkaException as exc:
            raise BrokerError(f"cannot start a transactional producer: {exc}") from exc
        self.transactions = 0

    def publish(
        self, unit: Hashable, outs: Sequence[Out], *, on_failed: Callable[[str], Sequence[Out]] | None = None
    ) -> None:
        # Held until the next commit: produced and committed with the offsets, all or nothing.
        self._pending.append((cast(tuple[TP, int], unit), outs))

    def advisory(self, outs: Sequence[Out]) -> None:
        self._advisory.extend(outs)

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def commit(self, consumer: Any, tracker: OffsetTracker, only: set[TP] | None = None) -> None:
        """Produce the held records and commit them with the offsets they allow, in one transaction."""
        pending = [p for p in self._pending if only is None or p[0][0] in only]
        if not pending and not self._advisory:
            return
        positions: dict[TP, int] = {}
        try:
            self._tx.begin_transaction()
            for out in self._advisory:
                self._produce(None, out, replaceable=False)
            for unit, outs in pending:
                for out in outs:
                    self._produce(unit, out, replaceable=False)
            for (tp, offset), _ in pending:
                tracker.done(tp, offset)
            positions = tracker.committable(only)
            if positions:
                offsets = [TopicPartition(t, p, pos) for (t, p), pos in positions.items()]
                self._tx.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            self._tx.commit_transaction(60)
        except KafkaException as exc:
            # Nothing of this transaction is visible to read_committed readers; the units are
            # redone after a restart.
            try:
                self._tx.abort_transaction(30)
            finally:
                raise BrokerError(f"transaction aborted: {exc}") from exc
        self._outstanding.clear()  # commit_transaction flushed: every record is acknowledged
        self.raise_on_error()
        tracker.mark_committed(positions)
        self._pending = [p for p in self._pending if p not in pending]
        self._advisory = []
        self.transactions += 1

    def poll(self) -> None:
        self.producer.poll(0)
        self.raise_on_error()

    def flush(self, timeout: float = 60.0) -> None:
        # Records go out inside commit(); nothing is produced outside a transaction.
        self.raise_on_error()
