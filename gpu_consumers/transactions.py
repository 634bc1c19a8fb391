"""Exactly-once results on Apache Kafka, opt-in (``SLUICE_KAFKA__TRANSACTIONAL=true``).

One transactional producer per consumer process (KIP-447: fenced by the consumer group's
metadata, so the transactional id need not be tied to partitions). The records of requests that
finished since the last commit (results, cost metrics, dead letters, statuses) and the source
offsets they allow are committed together in one short transaction after the work, every commit
interval; no transaction is ever held open around engine time (a long transaction stalls every
``read_committed`` reader and runs into ``transaction.timeout.ms``). A crash aborts the open
transaction: its requests run again and ``read_committed`` subscribers never see the first try.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from confluent_kafka import KafkaException, TopicPartition

from core.errors import BrokerError
from gpu_consumers.offsets import OffsetTracker
from gpu_consumers.outcomes import Out
from gpu_consumers.publisher import Producer, Publisher
from schemas import Serde

__all__ = ["TransactionalPublisher"]

logger = logging.getLogger(__name__)

TP = tuple[str, int]


class TransactionalPublisher(Publisher):
    def __init__(self, producer: Producer, serde: Serde, on_done: Callable[[TP, int], None]) -> None:
        super().__init__(producer, serde, on_done)
        self._pending: list[tuple[TP, int, Sequence[Out]]] = []
        self._advisory: list[Out] = []
        self._tx: Any = cast(Any, producer)  # the transactional calls of confluent_kafka.Producer
        try:
            self._tx.init_transactions(30)
        except KafkaException as exc:
            raise BrokerError(f"cannot start a transactional producer: {exc}") from exc
        self.transactions = 0

    def publish(self, tp: TP, offset: int, outs: Sequence[Out]) -> None:
        # Held until the next commit: produced and committed with the offsets, all or nothing.
        self._pending.append((tp, offset, outs))

    def advisory(self, outs: Sequence[Out]) -> None:
        self._advisory.extend(outs)

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def commit(self, consumer: Any, tracker: OffsetTracker, only: set[TP] | None = None) -> None:
        """Produce the held records and commit them with the offsets they allow, in one transaction."""
        pending = [p for p in self._pending if only is None or p[0] in only]
        if not pending and not self._advisory:
            return
        try:
            self._tx.begin_transaction()
            for out in self._advisory:
                self._produce(out, None)
            for _, _, outs in pending:
                for out in outs:
                    self._produce(out, self._error_only)
            for tp, offset, _ in pending:
                tracker.done(tp, offset)
            positions = tracker.committable()
            if only is not None:
                positions = {tp: pos for tp, pos in positions.items() if tp in only}
            if positions:
                offsets = [TopicPartition(t, p, pos) for (t, p), pos in positions.items()]
                self._tx.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            self._tx.commit_transaction(60)
        except KafkaException as exc:
            # Nothing of this transaction is visible to read_committed readers; the requests run
            # again after a restart.
            try:
                self._tx.abort_transaction(30)
            finally:
                raise BrokerError(f"transaction aborted: {exc}") from exc
        self.raise_on_error()
        tracker.mark_committed(positions)
        self._pending = [p for p in self._pending if p not in pending]
        self._advisory = []
        self.transactions += 1

    def _error_only(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")

    def flush(self, timeout: float = 60.0) -> None:
        # Records go out inside commit(); nothing is produced outside a transaction.
        self.raise_on_error()
