"""The ClickHouse schema dashboards point at: sorting keys, a migration from the earlier keys,
text TTLs, the ``*_latest`` views, and the hourly rollup `sluice stats` reads, which must give the
same figures as the raw tables (counted from raw rows with FINAL, duplicates included on write)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analytics.ddl import sorting_key
from analytics.query import savings_sql, stats_sql
from analytics.rollup import refresh_rollup, rollup_savings_sql, rollup_stats_sql
from analytics.sink import row_for
from analytics.store import Store
from schemas import CacheKind, CostMetric, InferenceResult, ResultStatus

pytestmark = [pytest.mark.clickhouse]

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def scratch(clickhouse_store: Store) -> Iterator[Store]:
    """The session's store on a database of its own (chDB allows one client per process)."""
    store = copy.copy(clickhouse_store)
    store.database = f"t_{uuid.uuid4().hex[:10]}"
    store.text_ttl_days = 0
    yield store
    store.command(f"DROP DATABASE IF EXISTS {store.database}")


def _insert(store: Store, records: list[Any]) -> None:
    by_table: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        table, row = row_for(record)
        by_table.setdefault(table, []).append(row)
    for table, rows in by_table.items():
        columns = list(rows[0])
        store.insert(table, [[r[c] for c in columns] for r in rows], columns)


def _pair(
    i: int, *, tenant: str, model: str, priority: str, hour: int, latency_ms: int, kind: str = "engine"
) -> list[Any]:
    created = T0 + timedelta(hours=hour, minutes=i % 50)
    done = created + timedelta(milliseconds=latency_ms)
    failed = kind == "failed"
    result = InferenceResult(
        request_id=f"{tenant}-{i}",
        tenant=tenant,
        priority=priority,
        model=model,
        status=ResultStatus.FAILED if failed else ResultStatus.SUCCEEDED,
        output_text="" if failed else f"answer {i}",
        prompt_tokens=10 + i % 7,
        completion_tokens=5 + i % 11,
        created_at=created,
        started_at=created,
        completed_at=done,
        cached=kind in ("exact", "semantic"),
        cache_kind=CacheKind(kind) if kind in ("exact", "semantic") else None,
        deduplicated_from="x" if kind in ("exact", "semantic", "duplicate") else None,
        engine_run_id="run" if kind == "engine" else None,
    )
    if failed:
        return [result]
    ran = kind == "engine"
    metric = CostMetric.for_result(
        result,
        cost_usd=0.001 * (1 + i % 3) if ran else 0.0,
        baseline_cost_usd=0.004 * (1 + i % 3),
        cached=kind in ("exact", "semantic"),
        deduplicated=kind == "duplicate",
    )
    return [result, metric]


def _workload(start: int, n: int) -> list[Any]:
    kinds = ["engine", "engine", "engine", "exact", "semantic", "duplicate", "failed"]
    out: list[Any] = []
    for i in range(start, start + n):
        out += _pair(
            i,
            tenant=("acme", "globex")[i % 2],
            model=("tiny", "big")[i % 3 == 0],
            priority=("high", "normal", "low")[i % 3],
            hour=i % 4,
            latency_ms=100 + (i * 37) % 5000,
            kind=kinds[i % len(kinds)],
        )
    return out


def _rows(store: Store, sql: str) -> list[dict[str, Any]]:
    return store.query(sql).dicts()


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-8), k


def test_the_rollup_gives_the_raw_tables_figures_through_redeliveries(scratch: Store) -> None:
    scratch.ensure_schema()
    db = scratch.database
    first = _workload(0, 120)
    _insert(scratch, first)
    _insert(scratch, first[:40])  # redelivered after a crash: raw rows twice, counted once
    since = refresh_rollup(scratch, None)
    _same(_rows(scratch, rollup_stats_sql(db)), _rows(scratch, stats_sql(db)))
    _same(_rows(scratch, rollup_savings_sql(db)), _rows(scratch, savings_sql(db)))

    # New rows in old hours and redeliveries: an incremental refresh recomputes those hours.
    more = _workload(120, 60)
    _insert(scratch, more + first[40:60])
    refresh_rollup(scratch, since)
    raw = _rows(scratch, stats_sql(db))
    _same(_rows(scratch, rollup_stats_sql(db)), raw)
    _same(_rows(scratch, rollup_savings_sql(db)), _rows(scratch, savings_sql(db)))
    assert sum(r["requests"] for r in raw) == 180
    savings = {r["tenant"]: r for r in _rows(scratch, rollup_savings_sql(db))}
    assert savings["acme"]["semantic_hits"] > 0 and savings["acme"]["cache_hits"] > 0
    tenant = _rows(scratch, rollup_stats_sql(db, "tenant = 'acme'"))
    _same(tenant, _rows(scratch, stats_sql(db, "r.tenant = 'acme'")))


def test_sorting_keys_views_and_text_ttl(scratch: Store) -> None:
    scratch.text_ttl_days = 7  # the rows below are older than that
    scratch.ensure_schema()
    db = scratch.database
    keys = dict(scratch.query(f"SELECT name, sorting_key FROM system.tables WHERE database = '{db}'").rows)
    assert keys["results"].replace(" ", "") == "toDate(created_at),tenant,model,request_id"
    assert keys["cost_metrics"].replace(" ", "") == sorting_key("cost_metrics").replace(" ", "")
    old = _pair(1, tenant="acme", model="tiny", priority="low", hour=0, latency_ms=5)
    _insert(scratch, old + old)
    # The views read like FINAL: one row per id, no FINAL needed.
    assert scratch.query(f"SELECT count() FROM {db}.results_latest").rows == [[1]]
    assert scratch.query(f"SELECT count() FROM {db}.cost_metrics_latest").rows == [[1]]
    assert scratch.query(f"SELECT last_state FROM {db}.request_status_latest").rows == []
    # Text older than the TTL is cleared, the row (latency, tokens) stays.
    scratch.command(f"ALTER TABLE {db}.results MATERIALIZE TTL SETTINGS mutations_sync = 2")
    scratch.command(f"OPTIMIZE TABLE {db}.results FINAL")
    assert scratch.query(f"SELECT output_text, prompt_tokens FROM {db}.results_latest").rows == [["", 11]]
    create = scratch.query(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = 'results'")
    assert "CODEC(ZSTD(3)) TTL" in create.rows[0][0]
    scratch.text_ttl_days = 0
    scratch.ensure_schema()
    create = scratch.query(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = 'results'")
    assert " TTL " not in create.rows[0][0]


def test_tables_of_an_earlier_release_are_migrated_to_the_new_keys(scratch: Store) -> None:
    db = scratch.database
    scratch.command(f"CREATE DATABASE {db}")
    from analytics.ddl import TABLES

    # The previous release: ordered by request id only.
    scratch.command(
        f"CREATE TABLE {db}.results ({TABLES['results']}) ENGINE = ReplacingMergeTree(ingested_at) "
        "PARTITION BY toYYYYMM(created_at) ORDER BY request_id"
    )
    rows = _workload(0, 14)
    _insert(scratch, [r for r in rows if isinstance(r, InferenceResult)])
    scratch.ensure_schema()
    tables = dict(scratch.query(f"SELECT name, sorting_key FROM system.tables WHERE database = '{db}'").rows)
    assert tables["results"].replace(" ", "") == "toDate(created_at),tenant,model,request_id"
    assert [t for t in tables if t.startswith("results__before_")]
    assert scratch.query(f"SELECT count() FROM {db}.results").rows == [[14]]


def test_a_batchs_at_risk_lines_are_counted_once_each(scratch: Store) -> None:
    from analytics.lookups import Lookups
    from gateway.batches import request_id_for
    from schemas import RequestState, RequestStatus

    scratch.ensure_schema()
    a, b = "batch_aaa", "batch_bbb"
    said = [RequestStatus.of(request_id_for(a, i), RequestState.AT_RISK, detail="slack -3 s") for i in (0, 1, 7)]
    _insert(
        scratch,
        [
            *said,
            said[0],  # redelivered: still one line
            RequestStatus.of(request_id_for(a, 2), RequestState.RUNNING),
            RequestStatus.of(request_id_for(b, 0), RequestState.QUEUED),
            RequestStatus.of("req-not-in-a-batch", RequestState.AT_RISK),
        ],
    )
    counts = Lookups(scratch.query, scratch.database).batch_at_risk([a, b])
    assert counts == {a: 3}
