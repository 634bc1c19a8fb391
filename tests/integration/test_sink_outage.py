"""The sink through a ClickHouse outage and a row ClickHouse refuses, counted as a subscriber
would: raw rows (no FINAL) and messages on the dead-letter topic. The outage is injected in front
of the real store (the embedded ClickHouse cannot be stopped under its owner)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from analytics.sink import ClickHouseSink
from analytics.store import Store
from core.catalog import Catalog
from core.errors import StoreError
from core.settings import Settings
from core.topics import Topics, ensure_topics
from producers import SluiceClient
from schemas import DeadLetter, DeadLetterReason, RequestState, RequestStatus, Serde
from tests.integration.helpers import topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


class OutageStore:
    """The real store, unreachable while ``down`` is set, and refusing status rows whose detail
    is "poison" the way ClickHouse refuses data it cannot take."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = threading.Event()
        self.failed_while_down = 0

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if self.down.is_set():
            self.failed_while_down += 1
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc
        if "detail" in columns and any(r[list(columns).index("detail")] == "poison" for r in rows):
            raise StoreError(f"insert into {table} failed: Code: 53. DB::Exception: Type mismatch (TYPE_MISMATCH)")
        self.store.insert(table, rows, columns)

    def ensure_schema(self) -> None:
        self.store.ensure_schema()

    # The sink also refreshes the hourly rollup through these; they fail alike while down.
    @property
    def database(self) -> str:
        return self.store.database

    def _check(self, what: str) -> None:
        if self.down.is_set():
            raise StoreError(f"{what} failed: [Errno 111] Connection refused")

    def command(self, sql: str) -> None:
        self._check("command")
        self.store.command(sql)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        self._check("query")
        return self.store.query(sql, parameters)


def test_an_outage_holds_the_sink_back_without_loss_and_a_refused_row_is_dead_lettered(
    settings: Settings, clickhouse_store: Store, serde: Serde, catalog: Catalog
) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings.kafka, topics.pipeline(catalog))
    outage = OutageStore(clickhouse_store)
    sink = ClickHouseSink(settings, outage)  # type: ignore[arg-type]
    sink.retry_initial_s = 0.1
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop, ready), daemon=True)
    thread.start()
    assert ready.wait(60)
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(60)]
    db = settings.clickhouse.database

    def rows() -> int:
        return int(
            clickhouse_store.query(
                f"SELECT count() FROM {db}.request_status WHERE request_id IN {{ids:Array(String)}}", {"ids": ids}
            ).rows[0][0]
        )

    with SluiceClient(settings) as client:
        for rid in ids[:20]:
            client.publish(topics.status, rid, RequestStatus.of(rid, RequestState.QUEUED, detail="before"))
        client.flush()
        wait_until(rows, lambda n: n == 20, timeout=60, what="rows before the outage")
        outage.down.set()
        for rid in ids[20:59]:
            client.publish(topics.status, rid, RequestStatus.of(rid, RequestState.QUEUED, detail="during"))
        client.publish(topics.status, ids[59], RequestStatus.of(ids[59], RequestState.QUEUED, detail="poison"))
        client.flush()
        time.sleep(30)  # ClickHouse away for 30 s while 40 events arrive
        assert rows() == 20 and outage.failed_while_down >= 3
        outage.down.clear()
    wait_until(rows, lambda n: n == 59, timeout=60, what="the sink to catch up")
    letters = wait_until(
        lambda: [
            d
            for d in topic_records(settings, topics.dead_letter, DeadLetter, serde, quiet_s=1)
            if d.request_id == ids[59]
        ],
        timeout=60,
        what="the refused row's dead letter",
    )
    assert letters[0].reason is DeadLetterReason.STORE_REFUSED and letters[0].source_topic == topics.status
    # The sink moved on: a later event still lands.
    with SluiceClient(settings) as client:
        client.publish(topics.status, f"{run}-after", RequestStatus.of(f"{run}-after", RequestState.QUEUED))
    ids.append(f"{run}-after")
    wait_until(rows, lambda n: n == 60, timeout=60, what="a row after the refusal")
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
