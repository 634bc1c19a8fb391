"""The ClickHouse sink: results, dead letters, cost metrics and status changes, written in batches.

It runs on the runtime's committing loop (``core.kafka.ConsumeLoop``): an event is done once its
row is inserted (or its dead letter acknowledged), and offsets are committed only up to done
events, so a crash re-inserts at most the batch in flight, and the ReplacingMergeTree tables
collapse the repeats. Undecodable events are counted and
skipped (they cannot be rows), never retried forever. While ClickHouse is unavailable the sink
holds its offsets and retries with backoff, and still stops when asked; a row ClickHouse refuses
for good becomes a ``store_refused`` dead letter and the others go in.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from analytics.rollup import refresh_rollup
from analytics.store import Store
from core import clients
from core.errors import SluiceError, StoreError
from core.kafka import ConsumeLoop, Handler, LazyProducer, Out, Producer, TrackedPublisher, message_coords
from core.metrics import SINK_ERRORS, SINK_ROWS, observe_records
from core.settings import Settings
from core.topics import Topics
from schemas import (
    AvroRecord,
    BatchStatus,
    CostMetric,
    DeadLetter,
    DeadLetterReason,
    InferenceResult,
    RequestStatus,
    Serde,
    Stage,
)

__all__ = ["ClickHouseSink", "Pending", "row_for"]

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


@dataclass(frozen=True)
class Pending:
    """A row waiting for its insert, with the event it came from (for a dead letter)."""

    row: dict[str, Any]
    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp_ms: int | None = None


class _Stopped(Exception):
    """Shutdown was asked while ClickHouse was unavailable."""


# ClickHouse error codes that mean "this data cannot go in", not "try later".
_DATA_ERRORS = {6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 349, 352, 354, 377, 457}
_CODE = re.compile(r"Code: (\d+)")


def _refused_for_good(exc: StoreError) -> bool:
    """A row ClickHouse (or the client's conversion to its types) refuses whatever the timing."""
    cause = exc.__cause__
    if isinstance(cause, TypeError | ValueError | OverflowError | struct.error) and not _CODE.search(str(exc)):
        return True
    return any(int(code) in _DATA_ERRORS for code in _CODE.findall(str(exc)))


def _missing_table(exc: StoreError) -> bool:
    text = str(exc)
    return "UNKNOWN_TABLE" in text or "Code: 60" in text or "does not exist" in text


def row_for(record: AvroRecord) -> tuple[str, dict[str, Any]]:
    table, fn = _TABLES[type(record)]
    return table, fn(record)


class ClickHouseSink(Handler):
    # First wait after a failed insert; doubles up to 30 s.
    retry_initial_s = 0.5

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        serde: Serde | None = None,
        on_rows: Callable[[str, list[dict[str, Any]]], None] | None = None,
        producer: Producer | None = None,
    ) -> None:
        """``producer`` (for refused rows' dead letters): the stub broker's in tests."""
        self.settings = settings
        self.store = store
        self.serde = serde or clients.serde(settings)
        self.topics = Topics(settings.topic_prefix)
        self._types: dict[str, type[AvroRecord]] = {
            self.topics.results: InferenceResult,
            self.topics.dead_letter: DeadLetter,
            self.topics.cost_metrics: CostMetric,
            self.topics.status: RequestStatus,
            self.topics.batches: BatchStatus,
        }
        self.group_id = f"{settings.topic_prefix}clickhouse-sink"
        self.on_rows = on_rows
        self.rows_written = 0
        self.skipped = 0
        self.refused = 0
        self._producer = producer
        self.publisher: TrackedPublisher | None = None
        self._pending: dict[str, list[Pending]] = {}
        self._count = 0
        self._first_at: float | None = None
        self._stop = threading.Event()
        # The first refresh recomputes every hour (rows may have arrived while no sink ran).
        self._rollup_at = float("-inf")
        self._rollup_since: datetime | None = None

    def loop(self, consumer: Any | None = None, *, stop: threading.Event | None = None) -> ConsumeLoop:
        """The committing loop over the output topics (``consumer``: the stub broker's in tests;
        ``stop`` ends an insert's retries while ClickHouse is away)."""
        if stop is not None:
            self._stop = stop
        ch = self.settings.clickhouse
        if consumer is None:
            # Rows wait up to sink_flush_ms anyway: a fetch may wait as long, which spares the
            # broker (and the host's CPU) a poll every few milliseconds while the pipeline is idle.
            consumer = clients.consumer(
                self.settings.kafka, "sink", self.group_id, **{"fetch.wait.max.ms": max(ch.sink_flush_ms, 10)}
            )
        if self._producer is None:
            self._producer = cast(
                Producer, LazyProducer(lambda: cast(Producer, clients.producer(self.settings.kafka, "sink")))
            )
        self.publisher = TrackedPublisher(self._producer, self.serde)
        return ConsumeLoop(
            self, consumer, list(self._types), publisher=self.publisher, batch=1000, max_batches=10, idle_wait_s=0.1
        )

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.loop(stop=stop).run(stop, ready)

    # -- the loop's handler ---------------------------------------------------------------------
    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        topic, partition, offset = message_coords(msg)
        value = msg.value() or b""
        try:
            record = self.serde.decode(self._types[topic], value)
        except SluiceError as exc:
            self.skipped += 1
            logger.error("sink skipped %s[%d]@%d: %s", topic, partition, offset, exc)
            loop.done((topic, partition), offset)
            return
        table, row = row_for(record)
        kind, ts = msg.timestamp()
        self._pending.setdefault(table, []).append(
            Pending(row, topic, partition, offset, value, ts if kind != TIMESTAMP_NOT_AVAILABLE else None)
        )
        self._count += 1
        self._first_at = self._first_at or time.monotonic()

    def on_cycle(self, loop: ConsumeLoop) -> bool:
        ch = self.settings.clickhouse
        due = self._first_at is not None and (
            self._count >= ch.sink_batch_size or time.monotonic() - self._first_at >= ch.sink_flush_ms / 1000
        )
        if due:
            self.flush(loop)
        self._maybe_refresh_rollup()
        return False

    def on_revoke(self, loop: ConsumeLoop, tps: set[tuple[str, int]]) -> None:
        self.flush(loop)

    def on_stop(self, loop: ConsumeLoop) -> None:
        self.flush(loop)

    def flush(self, loop: ConsumeLoop) -> None:
        """Insert every pending row; each event is done once its row is in (or its dead letter is
        acknowledged). Stopping while ClickHouse is away leaves the rest not done: uncommitted, the
        next sink inserts them."""
        pending, self._pending = self._pending, {}
        self._count, self._first_at = 0, None
        try:
            for table, items in pending.items():
                refused = self._insert(table, items, self._stop)
                refused_ids = {id(item) for item, _ in refused}
                for item, error in refused:
                    self._refuse(table, item, error)
                for item in items:
                    if id(item) not in refused_ids:
                        loop.done((item.topic, item.partition), item.offset)
        except _Stopped:
            left = sum(len(v) for v in pending.values())
            logger.warning("sink stopped with up to %d rows not inserted; they stay on their topics", left)

    def _maybe_refresh_rollup(self) -> None:
        now = time.monotonic()
        if now - self._rollup_at < self.settings.clickhouse.rollup_interval_s:
            return
        self._rollup_at = now
        try:
            self._rollup_since = refresh_rollup(self.store, self._rollup_since)
        except StoreError as exc:
            # The raw tables are complete; the rollup catches up on the next refresh.
            logger.warning("hourly rollup not refreshed: %s", exc)

    def _insert(self, table: str, items: list[Pending], stop: threading.Event) -> list[tuple[Pending, str]]:
        """Insert ``items``: transient failures (ClickHouse away, overloaded) wait with backoff
        while shutdown is honoured; a missing table is re-created; rows ClickHouse refuses for
        good are found by halving the batch and returned (they become dead letters), and the
        rest go in."""
        delay = self.retry_initial_s
        while True:
            try:
                refused = self._insert_or_split(table, items)
            except StoreError as exc:
                SINK_ERRORS.labels(table, "missing_table" if _missing_table(exc) else "unavailable").inc()
                if _missing_table(exc):
                    # Dropped by hand (or never created): re-create the schema and insert again.
                    logger.warning("%s: table %s is missing; re-creating the schema", exc, table)
                    try:
                        self.store.ensure_schema()
                        continue
                    except StoreError as again:
                        exc = again
                # Nothing is acknowledged early, so nothing is lost while ClickHouse is down.
                logger.error("%s; retrying in %.1fs", exc, delay)
                if stop.wait(delay):
                    raise _Stopped from exc
                delay = min(delay * 2, 30.0)
                continue
            inserted = len(items) - len(refused)
            SINK_ROWS.labels(table).inc(inserted)
            self.rows_written += inserted
            if self.on_rows:
                self.on_rows(table, [i.row for i in items if all(i is not r for r, _ in refused)])
            return refused

    def _insert_or_split(self, table: str, items: list[Pending]) -> list[tuple[Pending, str]]:
        """The rows refused for good (bad data); raises StoreError for anything else."""
        columns = list(items[0].row)
        try:
            self.store.insert(table, [[i.row[c] for c in columns] for i in items], columns)
            return []
        except StoreError as exc:
            if not _refused_for_good(exc):
                raise
            if len(items) == 1:
                return [(items[0], str(exc))]
        mid = len(items) // 2
        return self._insert_or_split(table, items[:mid]) + self._insert_or_split(table, items[mid:])

    def _refuse(self, table: str, item: Pending, error: str) -> None:
        self.refused += 1
        SINK_ERRORS.labels(table, "refused").inc()
        logger.error(
            "ClickHouse refused a %s row from %s[%d]@%d: %s", table, item.topic, item.partition, item.offset, error
        )
        unit = ((item.topic, item.partition), item.offset)
        assert self.publisher is not None
        if table == "dead_letters":
            # A dead letter of a dead letter would loop; the event stays on its topic.
            self.publisher.publish(unit, [])
            return
        row = item.row
        dl = DeadLetter.from_event(
            DeadLetterReason.STORE_REFUSED,
            f"{table}: {error}",
            stage=Stage.SINK,
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
            original=item.value,
            timestamp_ms=item.timestamp_ms,
        )
        dl.request_id, dl.tenant = row.get("request_id"), row.get("tenant")
        observe_records((dl,), source="sink")
        # The event is done once its dead letter is acknowledged.
        self.publisher.publish(unit, [Out(self.topics.dead_letter, dl.request_id or dl.dead_letter_id, dl)])
