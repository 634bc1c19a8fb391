"""Query the analytics tables from any process.

* ``http(s)://`` ClickHouse: query the server directly.
* ``chdb://`` while a stack owns the directory: go through its query endpoint.
* ``chdb://`` with no stack running: open the directory directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from analytics.query_server import token_path
from analytics.store import QueryResult, Store
from core.errors import StoreError
from core.settings import Settings
from core.stackfile import read_stack_file
from schemas import RequestState

__all__ = ["STATE_ORDER", "Query", "open_query", "savings_sql", "stats_sql", "status_sql"]

Query = Callable[[str, dict[str, Any] | None], QueryResult]


def _http_query(url: str, token: str) -> Query:
    def run(sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        body = json.dumps({"sql": sql, "parameters": parameters or {}}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        req = urllib.request.Request(f"{url}/query", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise StoreError(json.loads(exc.read() or b"{}").get("error", str(exc))) from exc
        except OSError as exc:
            raise StoreError(f"query endpoint {url} unreachable: {exc}") from exc
        return QueryResult(data["columns"], data["rows"])

    return run


def open_query(settings: Settings) -> Query:
    url = settings.clickhouse_url()
    if url.startswith("chdb://"):
        info = read_stack_file(settings.data_dir)
        if info is not None:
            try:
                token = token_path(settings.data_dir).read_text().strip()
            except OSError as exc:
                raise StoreError(f"cannot read the query token beside the stack file: {exc}") from exc
            return _http_query(info["query_url"], token)
    store = Store.from_settings(settings)
    store.ensure_schema()
    return store.query


def stats_sql(database: str, where: str = "1") -> str:
    """p50/p95 latency, tokens and cost by model and priority, with the saving against running
    the same tokens on the catalog's most capable model."""
    return f"""
        SELECT
            r.model AS model,
            r.priority AS priority,
            count() AS requests,
            countIf(r.status = 'failed') AS failed,
            toInt64(quantileExact(0.5)(r.latency_ms)) AS p50_ms,
            toInt64(quantileExact(0.95)(r.latency_ms)) AS p95_ms,
            sum(c.input_tokens) AS input_tokens,
            sum(c.output_tokens) AS output_tokens,
            round(sum(c.cost_usd), 8) AS cost_usd,
            round(sum(c.baseline_cost_usd) - sum(c.cost_usd), 8) AS saved_usd
        FROM {database}.results AS r FINAL
        LEFT JOIN (SELECT * FROM {database}.cost_metrics FINAL) AS c ON c.request_id = r.request_id
        WHERE {where}
        GROUP BY model, priority
        ORDER BY model, indexOf(['high', 'normal', 'low'], priority)
    """


def savings_sql(database: str, where: str = "1") -> str:
    """Per tenant: what dedupe, the exact cache, the semantic cache and routing saved against
    running every request on the catalog's most capable model (``baseline_cost_usd`` is that
    model's price for the same tokens).

    Aliases must not reuse column names: ClickHouse resolves a later ``cached`` to the alias."""
    return f"""
        SELECT
            tenant,
            count() AS requests,
            countIf(NOT deduplicated AND NOT cached) AS engine_runs,
            countIf(deduplicated) AS duplicates,
            countIf(cached AND ifNull(cache_kind, 'exact') != 'semantic') AS cache_hits,
            countIf(cached AND cache_kind = 'semantic') AS semantic_hits,
            sumIf(input_tokens + output_tokens, deduplicated OR cached) AS tokens_not_run,
            round(sum(cost_usd), 8) AS actual_usd,
            round(sum(baseline_cost_usd), 8) AS most_capable_usd,
            round(sumIf(baseline_cost_usd - cost_usd, deduplicated), 8) AS saved_dedupe_usd,
            round(sumIf(baseline_cost_usd - cost_usd, cached AND ifNull(cache_kind, 'exact') != 'semantic'), 8)
                AS saved_cache_usd,
            round(sumIf(baseline_cost_usd - cost_usd, cached AND cache_kind = 'semantic'), 8) AS saved_semantic_usd,
            round(sumIf(baseline_cost_usd - cost_usd, NOT deduplicated AND NOT cached), 8) AS saved_routing_usd,
            round(if(sum(baseline_cost_usd) > 0, 1 - sum(cost_usd) / sum(baseline_cost_usd), 0), 4) AS saved_fraction
        FROM {database}.cost_metrics FINAL
        WHERE {where}
        GROUP BY tenant
        ORDER BY tenant
    """


# How far along the lifecycle a state is: orders events that share a millisecond.
STATE_ORDER = [s.value for s in RequestState]


def status_sql(database: str) -> str:
    return f"""
        SELECT state, min(at) AS at, any(model) AS model, any(detail) AS detail
        FROM {database}.request_status FINAL
        WHERE request_id = {{request_id:String}}
        GROUP BY state
        ORDER BY at, indexOf({STATE_ORDER!r}, state)
    """
