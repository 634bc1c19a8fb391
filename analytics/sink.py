"""The ClickHouse sink: results, dead letters, cost metrics and status changes, written in batches.

Offsets are committed only after the insert returned, so a crash re-inserts at most one batch,
and the ReplacingMergeTree tables collapse the repeats. Undecodable events are counted and
skipped (they cannot be rows), never retried forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from analytics.store import Store
from schemas import AvroRecord, BatchStatus, CostMetric, DeadLetter, InferenceResult, RequestStatus, Serde
from sluice import clients
from sluice.errors import SluiceError, StoreError
from sluice.metrics import SINK_ROWS
from sluice.settings import Settings
from sluice.topics import Topics, message_coords

__all__ = ["ClickHouseSink", "row_for"]

logger = logging.getLogger(__name__)


def _result_row(r: InferenceResult) -> dict[str, Any]:
    row = r.model_dump(exclude={"schema_file"})
    row["latency_ms"] = r.latency_ms
    return row


def _dead_letter_row(d: DeadLetter) -> dict[str, Any]:
    row = d.model_dump()
    row["reason"] = d.reason.value
    return row


_TABLES: dict[type[AvroRecord], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    InferenceResult: ("results", _result_row),
    DeadLetter: ("dead_letters", _dead_letter_row),
    CostMetric: ("cost_metrics", lambda m: m.model_dump()),
    RequestStatus: ("request_status", lambda m: m.model_dump()),
    BatchStatus: ("batches", lambda m: m.model_dump()),
}


def _missing_table(exc: StoreError) -> bool:
    text = str(exc)
    return "UNKNOWN_TABLE" in text or "Code: 60" in text or "does not exist" in text


def row_for(record: AvroRecord) -> tuple[str, dict[str, Any]]:
    table, fn = _TABLES[type(record)]
    return table, fn(record)


class ClickHouseSink:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        serde: Serde | None = None,
        on_rows: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.serde = serde or clients.serde(settings)
        topics = Topics(settings.topic_prefix)
        self._types: dict[str, type[AvroRecord]] = {
            topics.results: InferenceResult,
            topics.dead_letter: DeadLetter,
            topics.cost_metrics: CostMetric,
            topics.status: RequestStatus,
            topics.batches: BatchStatus,
        }
        self.group_id = f"{settings.topic_prefix}clickhouse-sink"
        self.on_rows = on_rows
        self.rows_written = 0
        self.skipped = 0

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        ch = self.settings.clickhouse
        # Rows wait up to sink_flush_ms anyway: a fetch may wait as long, which spares the broker
        # (and the host's CPU) a poll every few milliseconds while the pipeline is idle.
        consumer = clients.consumer(
            self.settings.kafka, "sink", self.group_id, **{"fetch.wait.max.ms": max(ch.sink_flush_ms, 10)}
        )
        consumer.subscribe(
            list(self._types),
            on_assign=lambda c, p: ready.set() if ready is not None else None,
        )
        pending: dict[str, list[dict[str, Any]]] = {}
        offsets: dict[tuple[str, int], int] = {}
        count = 0
        first_at: float | None = None
        try:
            while not stop.is_set():
                for msg in consumer.consume(num_messages=1000, timeout=0.1):
                    if not self._accept(msg, pending, offsets):
                        continue
                    count += 1
                    first_at = first_at or time.monotonic()
                due = first_at is not None and (
                    count >= ch.sink_batch_size or time.monotonic() - first_at >= ch.sink_flush_ms / 1000
                )
                if due or (offsets and not count):
                    self._flush(consumer, pending, offsets)
                    count, first_at = 0, None
            if offsets:
                self._flush(consumer, pending, offsets)
        finally:
            consumer.close()

    def _accept(
        self,
        msg: Message,
        pending: dict[str, list[dict[str, Any]]],
        offsets: dict[tuple[str, int], int],
    ) -> bool:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                logger.warning("sink consume error: %s", err)
            return False
        topic, partition, offset = message_coords(msg)
        tp = (topic, partition)
        offsets[tp] = offset + 1
        try:
            record = self.serde.decode(self._types[topic], msg.value())
        except SluiceError as exc:
            self.skipped += 1
            logger.error("sink skipped %s[%d]@%d: %s", topic, partition, offset, exc)
            return True
        table, row = row_for(record)
        pending.setdefault(table, []).append(row)
        return True

    def _flush(
        self,
        consumer: Consumer,
        pending: dict[str, list[dict[str, Any]]],
        offsets: dict[tuple[str, int], int],
    ) -> None:
        for table, rows in list(pending.items()):
            if not rows:
                continue
            columns = list(rows[0])
            delay = 0.5
            while True:
                try:
                    self.store.insert(table, [[r[c] for c in columns] for r in rows], columns)
                    break
                except StoreError as exc:
                    if _missing_table(exc):
                        # Dropped by hand (or never created): re-create the schema and insert again.
                        logger.warning("%s: table %s is missing; re-creating the schema", exc, table)
                        try:
                            self.store.ensure_schema()
                            continue
                        except StoreError as again:
                            exc = again
                    # ClickHouse unavailable: hold the offsets and retry with exponential backoff;
                    # nothing is acknowledged early, so nothing is lost while it is down.
                    logger.error("%s; retrying in %.1fs", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
            SINK_ROWS.labels(table).inc(len(rows))
            self.rows_written += len(rows)
            if self.on_rows:
                self.on_rows(table, rows)
        pending.clear()
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            logger.warning("sink commit failed (%s); rows may be re-inserted (deduped)", exc)
        offsets.clear()
