"""The hourly rollup ``sluice stats`` reads instead of rescanning every result.

One row per (hour of completion, tenant, model, priority), computed from deduplicated rows
(``FINAL``) of ``results`` joined with ``cost_metrics``. The sink refreshes it: every hour that
received a result or a cost metric since the last refresh is recomputed whole and replaces its
previous rows (ReplacingMergeTree on ``computed_at``), so a late or redelivered row is counted
once, like in the raw tables. The first refresh of a process recomputes every hour.
"""

from __future__ import annotations

import logging
from datetime import datetime

from analytics.ddl import ROLLUP
from analytics.store import Store

__all__ = [
    "complete_up_to_sql",
    "live_savings_sql",
    "live_stats_sql",
    "refresh_rollup",
    "rollup_savings_sql",
    "rollup_stats_sql",
]

logger = logging.getLogger(__name__)

_FROM = """
    FROM {db}.results AS r FINAL
    LEFT JOIN (SELECT * FROM {db}.cost_metrics FINAL) AS c ON c.request_id = r.request_id
"""
_METERED = "c.request_id != ''"
_EXACT = f"{_METERED} AND c.cached AND ifNull(c.cache_kind, 'exact') != 'semantic'"
_SEMANTIC = f"{_METERED} AND c.cached AND c.cache_kind = 'semantic'"


def _select(db: str, where: str) -> str:
    return f"""
        SELECT
            toStartOfHour(r.completed_at) AS hour,
            r.tenant AS tenant,
            r.model AS model,
            r.priority AS priority,
            count() AS requests,
            countIf(r.status = 'failed') AS failed,
            quantilesExactState(0.5, 0.95)(r.latency_ms) AS latency,
            countIf({_METERED}) AS metered,
            sum(c.input_tokens) AS input_tokens,
            sum(c.output_tokens) AS output_tokens,
            sum(c.cost_usd) AS cost_usd,
            sum(c.baseline_cost_usd) AS baseline_cost_usd,
            countIf({_METERED} AND NOT c.deduplicated AND NOT c.cached) AS engine_runs,
            countIf({_METERED} AND c.deduplicated) AS duplicates,
            countIf({_EXACT}) AS cache_hits,
            countIf({_SEMANTIC}) AS semantic_hits,
            sumIf(c.input_tokens + c.output_tokens, {_METERED} AND (c.deduplicated OR c.cached)) AS tokens_not_run,
            sumIf(c.baseline_cost_usd - c.cost_usd, {_METERED} AND c.deduplicated) AS saved_dedupe_usd,
            sumIf(c.baseline_cost_usd - c.cost_usd, {_EXACT}) AS saved_cache_usd,
            sumIf(c.baseline_cost_usd - c.cost_usd, {_SEMANTIC}) AS saved_semantic_usd,
            sumIf(c.baseline_cost_usd - c.cost_usd, {_METERED} AND NOT c.deduplicated AND NOT c.cached)
                AS saved_routing_usd,
            now64(3) AS computed_at
        {_FROM.format(db=db)}
        WHERE {where}
        GROUP BY hour, tenant, model, priority
    """


_NAMES = (
    "hour, tenant, model, priority, requests, failed, latency, metered, input_tokens, output_tokens, cost_usd, "
    "baseline_cost_usd, engine_runs, duplicates, cache_hits, semantic_hits, tokens_not_run, saved_dedupe_usd, "
    "saved_cache_usd, saved_semantic_usd, saved_routing_usd, computed_at"
)
# A refresh reads the raw tables a moment after it notes its start; rows ingested within this
# margin of the newest refresh may have missed it, so their hours are read live too.
_REFRESH_MARGIN_S = 120


def _dirty_hours(db: str) -> str:
    """Hours with rows the rollup may not hold yet: ingested since (its newest refresh - margin)."""
    since = f"(SELECT max(computed_at) - INTERVAL {_REFRESH_MARGIN_S} SECOND FROM {db}.{ROLLUP})"
    return (
        f"SELECT DISTINCT toStartOfHour(completed_at) FROM {db}.results WHERE ingested_at >= {since} "
        f"OR request_id IN (SELECT request_id FROM {db}.cost_metrics WHERE ingested_at >= {since})"
    )


def _live(db: str) -> str:
    """The rollup's rows, with every hour that received rows since its last refresh recomputed
    from the raw tables: what ``sluice stats`` reads, never stale, still cheap."""
    dirty = _dirty_hours(db)
    return (
        f"(SELECT {_NAMES} FROM {db}.{ROLLUP} FINAL WHERE hour NOT IN ({dirty}) "
        f"UNION ALL {_select(db, f'toStartOfHour(r.completed_at) IN ({dirty})')})"
    )


def complete_up_to_sql(database: str) -> str:
    """When the figures are complete up to (everything ingested by then), and the rollup's newest
    refresh."""
    return f"SELECT now64(3, 'UTC') AS complete_up_to, (SELECT max(computed_at) FROM {database}.{ROLLUP}) AS rollup_at"


def refresh_rollup(store: Store, since: datetime | None) -> datetime:
    """Recompute the hours that received rows ingested at or after ``since`` (all hours when
    None); returns the time to pass as ``since`` next time."""
    db = store.database
    started = store.query("SELECT now64(3, 'UTC')").rows[0][0]
    if since is None:
        where = "1"
    else:
        stamp = since.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        dirty = (
            f"SELECT DISTINCT toStartOfHour(completed_at) FROM {db}.results "
            f"WHERE ingested_at >= toDateTime64('{stamp}', 3, 'UTC') "
            f"OR request_id IN (SELECT request_id FROM {db}.cost_metrics "
            f"WHERE ingested_at >= toDateTime64('{stamp}', 3, 'UTC'))"
        )
        where = f"toStartOfHour(r.completed_at) IN ({dirty})"
    store.command(f"INSERT INTO {db}.{ROLLUP} ({_NAMES}) {_select(db, where)}")
    # Rows ingested while this ran are picked up next time (ingested_at >= started).
    result: datetime = started
    return result


def rollup_stats_sql(database: str, where: str = "1", *, source: str | None = None) -> str:
    """:func:`analytics.query.stats_sql` from the rollup: the same columns and figures."""
    source = source or f"{database}.{ROLLUP} AS h FINAL"
    return f"""
        SELECT
            model,
            priority,
            sum(h.requests) AS requests,
            sum(h.failed) AS failed,
            toInt64(quantilesExactMerge(0.5, 0.95)(h.latency)[1]) AS p50_ms,
            toInt64(quantilesExactMerge(0.5, 0.95)(h.latency)[2]) AS p95_ms,
            sum(h.input_tokens) AS input_tokens,
            sum(h.output_tokens) AS output_tokens,
            round(sum(h.cost_usd), 8) AS cost_usd,
            round(sum(h.baseline_cost_usd) - sum(h.cost_usd), 8) AS saved_usd
        FROM {source}
        WHERE {where}
        GROUP BY model, priority
        ORDER BY model, indexOf(['high', 'normal', 'low'], priority)
    """


def rollup_savings_sql(database: str, where: str = "1", *, source: str | None = None) -> str:
    """:func:`analytics.query.savings_sql` from the rollup: the same columns and figures."""
    source = source or f"{database}.{ROLLUP} AS h FINAL"
    return f"""
        SELECT
            tenant,
            sum(h.metered) AS requests,
            sum(h.engine_runs) AS engine_runs,
            sum(h.duplicates) AS duplicates,
            sum(h.cache_hits) AS cache_hits,
            sum(h.semantic_hits) AS semantic_hits,
            sum(h.tokens_not_run) AS tokens_not_run,
            round(sum(h.cost_usd), 8) AS actual_usd,
            round(sum(h.baseline_cost_usd), 8) AS most_capable_usd,
            round(sum(h.saved_dedupe_usd), 8) AS saved_dedupe_usd,
            round(sum(h.saved_cache_usd), 8) AS saved_cache_usd,
            round(sum(h.saved_semantic_usd), 8) AS saved_semantic_usd,
            round(sum(h.saved_routing_usd), 8) AS saved_routing_usd,
            round(if(sum(h.baseline_cost_usd) > 0, 1 - sum(h.cost_usd) / sum(h.baseline_cost_usd), 0), 4)
                AS saved_fraction
        FROM {source}
        WHERE {where}
        GROUP BY tenant
        HAVING requests > 0
        ORDER BY tenant
    """


def live_stats_sql(database: str, where: str = "1") -> str:
    """:func:`rollup_stats_sql` with the hours the rollup has not caught up on read live."""
    return rollup_stats_sql(database, where, source=f"{_live(database)} AS h")


def live_savings_sql(database: str, where: str = "1") -> str:
    """:func:`rollup_savings_sql` with the hours the rollup has not caught up on read live."""
    return rollup_savings_sql(database, where, source=f"{_live(database)} AS h")
