"""The sink's insert path against a store double: an outage is waited out (and a stop honoured
without committing), a row ClickHouse refuses for good becomes a dead letter while the others go
in, and a dropped table is re-created."""

from __future__ import annotations

import threading
from typing import Any

from analytics.sink import ClickHouseSink, Pending
from core.errors import StoreError
from core.settings import Settings
from schemas import DeadLetter, DeadLetterReason, Serde, Stage


def _fail(message: str, cause: BaseException) -> StoreError:
    try:
        raise StoreError(message) from cause
    except StoreError as exc:
        return exc


class StoreDouble:
    def __init__(self, down_for: int = 0, refuse: frozenset[str] = frozenset(), missing: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.down_for, self.refuse, self.missing = down_for, refuse, missing
        self.attempts = 0
        self.schema_created = 0

    def insert(self, table: str, rows: list[list[Any]], columns: list[str]) -> None:
        self.attempts += 1
        if self.missing:
            raise _fail(f"insert into {table} failed: Code: 60. UNKNOWN_TABLE", RuntimeError("server"))
        if self.down_for > 0:
            self.down_for -= 1
            raise _fail(f"insert into {table} failed: connection refused", ConnectionRefusedError(111, "refused"))
        dicts = [dict(zip(columns, r, strict=True)) for r in rows]
        if any(d.get("request_id") in self.refuse for d in dicts):
            raise _fail(f"insert into {table} failed: Code: 53. TYPE_MISMATCH", RuntimeError("server"))
        self.rows.extend(dicts)

    def ensure_schema(self) -> None:
        self.schema_created += 1
        self.missing = False


class ConsumerDouble:
    def __init__(self) -> None:
        self.commits: list[list[Any]] = []

    def commit(self, offsets: list[Any], asynchronous: bool = False) -> None:
        self.commits.append(offsets)


class ProducerDouble:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, value))

    def flush(self, timeout: float = 0) -> int:
        return 0


def _sink(store: StoreDouble) -> tuple[ClickHouseSink, ProducerDouble]:
    sink = ClickHouseSink(Settings(topic_prefix="k."), store)  # type: ignore[arg-type]
    sink.retry_initial_s = 0.01
    producer = ProducerDouble()
    sink._producer = producer
    return sink, producer


def _pending(n: int, table: str = "request_status") -> dict[str, list[Pending]]:
    return {
        table: [
            Pending({"request_id": f"r{i}", "state": "queued"}, "k.status", 0, i, f"raw{i}".encode(), 1000 + i)
            for i in range(n)
        ]
    }


def test_an_outage_is_waited_out_and_nothing_is_lost() -> None:
    store = StoreDouble(down_for=4)
    sink, producer = _sink(store)
    consumer = ConsumerDouble()
    sink._flush(consumer, _pending(5), {("k.status", 0): 5}, threading.Event())  # type: ignore[arg-type]
    assert [r["request_id"] for r in store.rows] == [f"r{i}" for i in range(5)]
    assert store.attempts == 5 and len(consumer.commits) == 1 and producer.sent == []


def test_stopping_during_an_outage_commits_nothing() -> None:
    store = StoreDouble(down_for=10**6)
    sink, _ = _sink(store)
    consumer = ConsumerDouble()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    sink._flush(consumer, _pending(3), {("k.status", 0): 3}, stop)  # type: ignore[arg-type]
    assert stop.is_set() and store.rows == [] and consumer.commits == []


def test_a_row_refused_for_good_is_dead_lettered_and_the_rest_go_in() -> None:
    store = StoreDouble(refuse=frozenset({"r5"}))
    sink, producer = _sink(store)
    consumer = ConsumerDouble()
    sink._flush(consumer, _pending(8), {("k.status", 0): 8}, threading.Event())  # type: ignore[arg-type]
    assert sorted(r["request_id"] for r in store.rows) == sorted(f"r{i}" for i in range(8) if i != 5)
    ((topic, value),) = producer.sent
    dl = Serde().decode(DeadLetter, value)
    assert topic == "k.dead-letter" and dl.reason is DeadLetterReason.STORE_REFUSED and dl.stage is Stage.SINK
    assert (dl.request_id, dl.source_topic, dl.source_offset, dl.original) == ("r5", "k.status", 5, b"raw5")
    assert "TYPE_MISMATCH" in dl.error and len(consumer.commits) == 1 and sink.refused == 1


def test_a_refused_dead_letter_row_does_not_loop() -> None:
    store = StoreDouble(refuse=frozenset({"r0"}))
    sink, producer = _sink(store)
    sink._flush(ConsumerDouble(), _pending(2, "dead_letters"), {}, threading.Event())  # type: ignore[arg-type]
    assert producer.sent == [] and [r["request_id"] for r in store.rows] == ["r1"]


def test_a_missing_table_is_recreated() -> None:
    store = StoreDouble(missing=True)
    sink, _ = _sink(store)
    sink._flush(ConsumerDouble(), _pending(2), {}, threading.Event())  # type: ignore[arg-type]
    assert store.schema_created == 1 and len(store.rows) == 2
