"""ClickHouse DDL owned by Sluice. ReplacingMergeTree keyed by id makes every table idempotent:
a result re-delivered after a crash replaces its twin instead of counting twice (queries read
with FINAL)."""

from __future__ import annotations

__all__ = ["TABLES", "ddl_statements"]

_TS = "DateTime64(3, 'UTC')"

TABLES: dict[str, str] = {
    "results": f"""
        request_id String,
        tenant LowCardinality(String),
        priority LowCardinality(String),
        model LowCardinality(String),
        status LowCardinality(String),
        output_text String,
        finish_reason Nullable(String),
        prompt_tokens UInt32,
        completion_tokens UInt32,
        error Nullable(String),
        created_at {_TS},
        started_at {_TS},
        completed_at {_TS},
        latency_ms Int64,
        correlation_id Nullable(String),
        route_reason Nullable(String),
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
        error String,
        request_id Nullable(String),
        tenant Nullable(String),
        model Nullable(String),
        priority Nullable(String),
        source_topic String,
        source_partition Int32,
        source_offset Int64,
        attempt Int32,
        original String,
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
        detail Nullable(String),
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
        ingested_at {_TS} DEFAULT now64(3)
    """,
}

_KEYS = {
    "results": "request_id",
    "dead_letters": "dead_letter_id",
    "cost_metrics": "request_id",
    # The status history keeps one row per state change; a redelivered change collapses.
    "request_status": "(request_id, state, at)",
    "batches": "batch_id",
}
# The version column of each ReplacingMergeTree: the row with the highest wins under FINAL. A
# batch's status is replaced by its latest update, whatever order the sink sees them in.
_VERSION = {"batches": "updated_at"}
_PARTITION = {"request_status": "toYYYYMM(at)"}


def ddl_statements(database: str) -> list[str]:
    stmts = [f"CREATE DATABASE IF NOT EXISTS {database}"]
    for table, columns in TABLES.items():
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {database}.{table} ({columns}) "
            f"ENGINE = ReplacingMergeTree({_VERSION.get(table, 'ingested_at')}) "
            f"PARTITION BY {_PARTITION.get(table, 'toYYYYMM(created_at)')} ORDER BY {_KEYS[table]}"
        )
        # Additive migration: columns added in later releases appear in existing tables.
        for column in (c.strip() for c in columns.split(",\n")):
            if column:
                stmts.append(f"ALTER TABLE {database}.{table} ADD COLUMN IF NOT EXISTS {column}")
    return stmts
