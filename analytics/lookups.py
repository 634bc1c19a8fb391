"""The questions the HTTP gateway asks of the analytics tables, answered as records.

The gateway never writes SQL: it asks these functions (over a :data:`analytics.query.Query`, which
reaches a ClickHouse server, a running stack's query endpoint or an embedded directory). Every
read is of the deduplicated view (``FINAL``): redeliveries count once, as a user expects of an
API answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from analytics.query import Query
from schemas import BatchState, BatchStatus, InferenceResult

__all__ = ["Lookups"]

_PAGE = 1000
_RESULT_FIELDS = ", ".join(InferenceResult.model_fields)
_TERMINAL = [s.value for s in BatchState if s.terminal]


class Lookups:
    def __init__(self, query: Query, database: str) -> None:
        self.query = query
        self.db = database

    # -- requests -------------------------------------------------------------------------------
    def result(self, request_id: str, tenant: str) -> InferenceResult | None:
        rows = self.query(
            f"SELECT {_RESULT_FIELDS} FROM {self.db}.results FINAL WHERE request_id = {{id:String}} "
            "AND tenant = {t:String}",
            {"id": request_id, "t": tenant},
        ).dicts()
        return InferenceResult.model_validate(rows[0]) if rows else None

    def latest_state(self, request_id: str, tenant: str) -> str | None:
        """The request's newest state on the status topic, if it is ``tenant``'s."""
        rows = self.query(
            "SELECT argMax(state, at) AS state, countIf(tenant = {t:String}) AS mine "
            f"FROM {self.db}.request_status FINAL WHERE request_id = {{id:String}}",
            {"id": request_id, "t": tenant},
        ).dicts()
        if rows and int(rows[0]["mine"]):
            return str(rows[0]["state"])
        return None

    # -- batches --------------------------------------------------------------------------------
    def batch(self, batch_id: str) -> BatchStatus | None:
        rows = self.query(
            f"SELECT * EXCEPT ingested_at FROM {self.db}.batches FINAL WHERE batch_id = {{id:String}}",
            {"id": batch_id},
        ).dicts()
        return BatchStatus.model_validate(rows[0]) if rows else None

    def batches_of(self, tenant: str) -> list[BatchStatus]:
        rows = self.query(
            f"SELECT * EXCEPT ingested_at FROM {self.db}.batches FINAL WHERE tenant = {{t:String}}",
            {"t": tenant},
        ).dicts()
        return [BatchStatus.model_validate(r) for r in rows]

    def open_batches(self) -> list[BatchStatus]:
        rows = self.query(
            f"SELECT * EXCEPT ingested_at FROM {self.db}.batches FINAL WHERE state NOT IN {{done:Array(String)}}",
            {"done": _TERMINAL},
        ).dicts()
        return [BatchStatus.model_validate(r) for r in rows]

    def batch_counts(self, batch_ids: list[str]) -> dict[str, tuple[int, int]]:
        """(succeeded, failed) results per batch."""
        rows = self.query(
            "SELECT batch_id, countIf(status = 'succeeded') AS ok, countIf(status = 'failed') AS bad "
            f"FROM {self.db}.results FINAL WHERE batch_id IN {{ids:Array(String)}} GROUP BY batch_id",
            {"ids": batch_ids},
        ).dicts()
        return {r["batch_id"]: (int(r["ok"]), int(r["bad"])) for r in rows}

    def batch_at_risk(self, batch_ids: list[str]) -> dict[str, int]:
        """Lines said at_risk per batch (a line's request id is its batch id, a dash, its index)."""
        rows = self.query(
            "SELECT replaceRegexpOne(request_id, '-[0-9]+$', '') AS batch_id, "
            "uniqExact(request_id) AS n "
            f"FROM {self.db}.request_status WHERE state = 'at_risk' AND batch_id IN {{ids:Array(String)}} "
            "GROUP BY batch_id",
            {"ids": batch_ids},
        ).dicts()
        return {r["batch_id"]: int(r["n"]) for r in rows}

    def batch_results(self, batch_id: str) -> Iterator[InferenceResult]:
        """The batch's results in request-id order, a page at a time."""
        last = ""
        while True:
            rows = self.query(
                f"SELECT {_RESULT_FIELDS} FROM {self.db}.results FINAL "
                f"WHERE batch_id = {{b:String}} AND request_id > {{after:String}} ORDER BY request_id LIMIT {_PAGE}",
                {"b": batch_id, "after": last},
            ).dicts()
            for row in rows:
                yield InferenceResult.model_validate(row)
            if len(rows) < _PAGE:
                return
            last = rows[-1]["request_id"]
