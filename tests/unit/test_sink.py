"""The sink's insert path against a store double: an outage is waited out (and a stop honoured
without committing), a row ClickHouse refuses for good becomes a dead letter while the others go
in, and a dropped table is re-created."""

from __future__ import annotations

import threading
from typing import Any

from analytics.sink import ClickHouseSink
from core.errors import StoreError
from core.kafka import ConsumeLoop
from core.kafka.stub import StubBroker
from core.settings import Settings
from core.topics import Topics
from schemas import DeadLetter, DeadLetterReason, RequestState, RequestStatus, Serde, Stage


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

    database = "sluice"

    def query(self, sql: str) -> Any:
        # The hourly rollup is not this double's business: the sink logs and carries on.
        raise StoreError("no rollup in the store double")

    def ensure_schema(self) -> None:
        self.schema_created += 1
        self.missing = False


TOPICS = Topics("k.")
GROUP = "k.clickhouse-sink"
SERDE = Serde()


def _sink(store: StoreDouble, stop: threading.Event | None = None) -> tuple[ClickHouseSink, ConsumeLoop, StubBroker]:
    broker = StubBroker()
    for topic in (TOPICS.results, TOPICS.dead_letter, TOPICS.cost_metrics, TOPICS.status, TOPICS.batches):
        broker.create_topic(topic)
    settings = Settings(topic_prefix="k.", clickhouse={"sink_flush_ms": 0, "rollup_interval_s": 3600})
    sink = ClickHouseSink(settings, store, serde=SERDE, producer=broker.producer())  # type: ignore[arg-type]
    sink.retry_initial_s = 0.01
    return sink, sink.loop(broker.consumer(GROUP), stop=stop), broker


def _statuses(broker: StubBroker, n: int) -> None:
    for i in range(n):
        rec = RequestStatus.of(f"r{i}", RequestState.QUEUED, tenant="t")
        broker.append(TOPICS.status, SERDE.encode(rec), f"r{i}".encode())


def _committed(broker: StubBroker) -> int:
    return broker.committed.get(GROUP, {}).get((TOPICS.status, 0), 0)


def _cycle(loop: ConsumeLoop) -> None:
    loop.run_once(wait=0)  # intake and insert
    loop.run_once(wait=0)  # dead letters acknowledged
    loop.commit(asynchronous=False)


def test_an_outage_is_waited_out_and_nothing_is_lost() -> None:
    store = StoreDouble(down_for=4)
    _, loop, broker = _sink(store)
    _statuses(broker, 5)
    _cycle(loop)
    assert [r["request_id"] for r in store.rows] == [f"r{i}" for i in range(5)]
    assert store.attempts == 5 and _committed(broker) == 5 and broker.messages(TOPICS.dead_letter) == []


def test_stopping_during_an_outage_commits_nothing() -> None:
    store = StoreDouble(down_for=10**6)
    stop = threading.Event()
    _, loop, broker = _sink(store, stop)
    _statuses(broker, 3)
    threading.Timer(0.2, stop.set).start()
    loop.run_once(wait=0)
    loop.finish()
    assert stop.is_set() and store.rows == [] and _committed(broker) == 0


def test_a_row_refused_for_good_is_dead_lettered_and_the_rest_go_in() -> None:
    store = StoreDouble(refuse=frozenset({"r5"}))
    sink, loop, broker = _sink(store)
    _statuses(broker, 8)
    _cycle(loop)
    assert sorted(r["request_id"] for r in store.rows) == sorted(f"r{i}" for i in range(8) if i != 5)
    (msg,) = broker.messages(TOPICS.dead_letter)
    dl = SERDE.decode(DeadLetter, msg.value())
    assert dl.reason is DeadLetterReason.STORE_REFUSED and dl.stage is Stage.SINK
    assert (dl.request_id, dl.source_topic, dl.source_offset) == ("r5", TOPICS.status, 5)
    assert dl.original == broker.messages(TOPICS.status)[5].value()
    assert "TYPE_MISMATCH" in dl.error and _committed(broker) == 8
    # The sink reads its own dead letter back; this double refuses its row too (request id r5),
    # and it is not dead-lettered again.
    assert sink.refused == 2 and len(broker.messages(TOPICS.dead_letter)) == 1


def test_a_refused_dead_letter_row_does_not_loop() -> None:
    store = StoreDouble(refuse=frozenset({"r0"}))
    _, loop, broker = _sink(store)
    for i in range(2):
        dl = DeadLetter.from_event(
            DeadLetterReason.VALIDATION_ERROR,
            "bad",
            stage=Stage.PROCESSOR,
            topic="x",
            partition=0,
            offset=i,
            original=b"",
        )
        dl.request_id = f"r{i}"
        broker.append(TOPICS.dead_letter, SERDE.encode(dl))
    _cycle(loop)
    assert len(broker.messages(TOPICS.dead_letter)) == 2  # nothing added
    assert [r["request_id"] for r in store.rows] == ["r1"]
    assert broker.committed[GROUP][(TOPICS.dead_letter, 0)] == 2


def test_a_missing_table_is_recreated() -> None:
    store = StoreDouble(missing=True)
    _, loop, broker = _sink(store)
    _statuses(broker, 2)
    _cycle(loop)
    assert store.schema_created == 1 and len(store.rows) == 2 and _committed(broker) == 2


def test_an_undecodable_event_is_skipped_and_committed() -> None:
    store = StoreDouble()
    sink, loop, broker = _sink(store)
    broker.append(TOPICS.status, b"not avro")
    _statuses(broker, 1)
    _cycle(loop)
    assert sink.skipped == 1 and [r["request_id"] for r in store.rows] == ["r0"] and _committed(broker) == 2
