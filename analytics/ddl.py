"""ClickHouse DDL owned by Sluice. ReplacingMergeTree with the id last in the sorting key makes
every table idempotent: a result re-delivered after a crash replaces its twin instead of counting
twice (queries read with FINAL, or the ``*_latest`` views)."""

from __future__ import annotations

__all__ = [
    "LATEST_VIEWS",
    "ROLLUP",
    "TABLES",
    "TTL_COLUMNS",
    "create_table",
    "ddl_statements",
    "sorting_key",
    "ttl_statements",
    "view_statements",
]

_TS = "DateTime64(3, 'UTC')"

TABLES: dict[str, str] = {
    "results": f"""
        request_id String,
        tenant LowCardinality(String),
        priority LowCardinality(String),
        model LowCardinality(String),
        status LowCardinality(String),
        output_text String CODEC(ZSTD(3)),
        finish_reason Nullable(String),
        prompt_tokens UInt32,
        completion_tokens UInt32,
        error Nullable(String) CODEC(ZSTD(3)),
        created_at {_TS},
        started_at {_TS},
        completed_at {_TS},
        latency_ms Int64,
        correlation_id Nullable(String),
        route_reason Nullable(String) CODEC(ZSTD(3)),
        deduplicated_from Nullable(String),
        cached Bool,
        replay_of Nullable(String),
        batch_id Nullable(String),
        dedupe_key Nullable(String),
        attempt Int32 DEFAULT 0,
        custom_id Nullable(String),
        engine_run_id Nullable(String),
        reply_to Nullable(String),
        webhook_url Nullable(String),
        cache_kind LowCardinality(Nullable(String)),
        similarity Nullable(Float64),
        ingested_at {_TS} DEFAULT now64(3)
    """,
    "dead_letters": f"""
        dead_letter_id String,
        reason LowCardinality(String),
        error String CODEC(ZSTD(3)),
        request_id Nullable(String),
        tenant Nullable(String),
        model Nullable(String),
        priority Nullable(String),
        source_topic String,
        source_partition Int32,
        source_offset Int64,
        attempt Int32,
        original String CODEC(ZSTD(3)),
        stage LowCardinality(String),
        created_at {_TS},
        ingested_at {_TS} DEFAULT now64(3)
    """,
    "cost_metrics": f"""
        request_id String,
        tenant LowCardinality(String),
        priority LowCardinality(String),
        model LowCardinality(String),
        input_tokens UInt32,
        output_tokens UInt32,
        queue_wait_ms Int64,
        engine_ms Float64,
        latency_ms Int64,
        cost_usd Float64,
        baseline_cost_usd Float64,
        batch_id Nullable(String),
        batch_size UInt32,
        cached Bool,
        deduplicated Bool,
        created_at {_TS},
        engine_run_id Nullable(String),
        cache_kind LowCardinality(Nullable(String)),
        ingested_at {_TS} DEFAULT now64(3)
    """,
    "request_status": f"""
        request_id String,
        state LowCardinality(String),
        at {_TS},
        model Nullable(String),
        detail Nullable(String) CODEC(ZSTD(3)),
        tenant Nullable(String),
        ingested_at {_TS} DEFAULT now64(3)
    """,
    "batches": f"""
        batch_id String,
        tenant LowCardinality(String),
        state LowCardinality(String),
        endpoint String,
        input_file_id String,
        completion_window String,
        priority LowCardinality(String),
        total UInt32,
        completed UInt32,
        failed UInt32,
        output_file_id Nullable(String),
        error_file_id Nullable(String),
        error Nullable(String),
        webhook_url Nullable(String),
        metadata Map(String, String),
        created_at {_TS},
        expires_at {_TS},
        updated_at {_TS},
        in_progress_at Nullable({_TS}),
        finalizing_at Nullable({_TS}),
        ended_at Nullable({_TS}),
        cancelling_at Nullable({_TS}),
        output_expires_after_s Nullable(Int64),
        at_risk UInt32 DEFAULT 0,
        ingested_at {_TS} DEFAULT now64(3)
    """,
}

# Sorting keys lead with what dashboards filter on (day, tenant, model) and end with the id, so
# ReplacingMergeTree still collapses a redelivered row into its twin: every column of the key is
# fixed for a given id. Readers use FINAL (or the *_latest views).
_KEYS = {
    "results": "(toDate(created_at), tenant, model, request_id)",
    "dead_letters": "(toDate(created_at), reason, dead_letter_id)",
    "cost_metrics": "(toDate(created_at), tenant, model, request_id)",
    # The status history keeps one row per state change; a redelivered change collapses.
    "request_status": "(request_id, state, at)",
    "batches": "batch_id",
}
# The version column of each ReplacingMergeTree: the row with the highest wins under FINAL. A
# batch's status is replaced by its latest update, whatever order the sink sees them in.
_VERSION = {"batches": "updated_at"}
_PARTITION = {"request_status": "toYYYYMM(at)"}
# Lookups by id, which is no longer a key prefix.
_INDEXES = {
    "results": ["INDEX idx_request_id request_id TYPE bloom_filter GRANULARITY 4"],
    "cost_metrics": ["INDEX idx_request_id request_id TYPE bloom_filter GRANULARITY 4"],
    "dead_letters": ["INDEX idx_request_id request_id TYPE bloom_filter GRANULARITY 4"],
}
# Text that may hold personal data expires after ``text_ttl_days`` (when set): column TTLs reset it
# to the empty string, the rest of the row (counts, cost, latency) stays.
TTL_COLUMNS = {"results": [("output_text", "created_at")], "dead_letters": [("original", "created_at")]}

# What dashboards read instead of remembering FINAL: the latest version of every row.
LATEST_VIEWS = {
    "results_latest": "SELECT * FROM {db}.results FINAL",
    "cost_metrics_latest": "SELECT * FROM {db}.cost_metrics FINAL",
    "dead_letters_latest": "SELECT * FROM {db}.dead_letters FINAL",
    "batches_latest": "SELECT * FROM {db}.batches FINAL",
    "request_status_latest": (
        # Aliases must not reuse column names: ClickHouse would resolve a later `at` to the alias.
        "SELECT request_id, argMax(state, at) AS last_state, max(at) AS last_at, argMax(model, at) AS last_model, "
        "argMax(detail, at) AS last_detail, any(tenant) AS request_tenant FROM {db}.request_status FINAL "
        "GROUP BY request_id"
    ),
}

# The hourly rollup `sluice stats` reads: one row per (hour of completion, tenant, model,
# priority), recomputed from deduplicated rows (FINAL) for every hour that received rows.
ROLLUP = "hourly"
ROLLUP_COLUMNS = f"""
        hour DateTime('UTC'),
        tenant LowCardinality(String),
        model LowCardinality(String),
        priority LowCardinality(String),
        requests UInt64,
        failed UInt64,
        latency AggregateFunction(quantilesExact(0.5, 0.95), Int64),
        metered UInt64,
        input_tokens UInt64,
        output_tokens UInt64,
        cost_usd Float64,
        baseline_cost_usd Float64,
        engine_runs UInt64,
        duplicates UInt64,
        cache_hits UInt64,
        semantic_hits UInt64,
        tokens_not_run UInt64,
        saved_dedupe_usd Float64,
        saved_cache_usd Float64,
        saved_semantic_usd Float64,
        saved_routing_usd Float64,
        computed_at {_TS}
"""


def _column_ttl(column: str, ts: str, days: int) -> str:
    return f"{column} String CODEC(ZSTD(3)) TTL {ts} + INTERVAL {days} DAY"


def create_table(database: str, table: str, name: str | None = None, text_ttl_days: int = 0) -> str:
    columns = TABLES[table]
    if text_ttl_days > 0:
        for column, ts in TTL_COLUMNS.get(table, []):
            columns = columns.replace(f"{column} String CODEC(ZSTD(3))", _column_ttl(column, ts, text_ttl_days))
    body = ",\n".join([columns.rstrip(), *(f"        {i}" for i in _INDEXES.get(table, []))])
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.{name or table} ({body}) "
        f"ENGINE = ReplacingMergeTree({_VERSION.get(table, 'ingested_at')}) "
        f"PARTITION BY {_PARTITION.get(table, 'toYYYYMM(created_at)')} ORDER BY {_KEYS[table]}"
    )


def sorting_key(table: str) -> str:
    """The key as ClickHouse reports it in ``system.tables.sorting_key``."""
    return _KEYS[table].removeprefix("(").removesuffix(")") if _KEYS[table].startswith("(") else _KEYS[table]


def ddl_statements(database: str, text_ttl_days: int = 0) -> list[str]:
    stmts = [f"CREATE DATABASE IF NOT EXISTS {database}"]
    for table, columns in TABLES.items():
        stmts.append(create_table(database, table, text_ttl_days=text_ttl_days))
        # Additive migration: columns added in later releases appear in existing tables.
        for column in (c.strip() for c in columns.split(",\n")):
            if column:
                stmts.append(f"ALTER TABLE {database}.{table} ADD COLUMN IF NOT EXISTS {column}")
    stmts.append(
        f"CREATE TABLE IF NOT EXISTS {database}.{ROLLUP} ({ROLLUP_COLUMNS}) "
        f"ENGINE = ReplacingMergeTree(computed_at) ORDER BY (hour, tenant, model, priority)"
    )
    return stmts


def view_statements(database: str) -> list[str]:
    return [f"CREATE OR REPLACE VIEW {database}.{v} AS {q.format(db=database)}" for v, q in LATEST_VIEWS.items()]


def ttl_statements(database: str, text_ttl_days: int) -> list[str]:
    """Bring column TTLs of existing tables to ``text_ttl_days`` (0: keep text forever)."""
    out = []
    for table, cols in TTL_COLUMNS.items():
        for column, ts in cols:
            if text_ttl_days > 0:
                out.append(f"ALTER TABLE {database}.{table} MODIFY COLUMN {_column_ttl(column, ts, text_ttl_days)}")
            else:
                out.append(f"ALTER TABLE {database}.{table} MODIFY COLUMN {column} REMOVE TTL")
    return out
