"""Test doubles for the gateway's batch logic: a stub broker (what would be published) and an
in-memory stand-in for ClickHouse's deduplicated results table."""

from __future__ import annotations

from typing import Any

from analytics.store import QueryResult
from schemas import AvroRecord, InferenceRequest, InferenceResult, ResultStatus, utcnow

__all__ = ["MemoryPublisher", "MemoryResults"]


class MemoryPublisher:
    """The stub broker: records what would be published."""

    def __init__(self) -> None:
        self.requests: list[InferenceRequest] = []
        self.records: list[tuple[str, str, AvroRecord]] = []
        self.cancelled: list[str] = []

    def submit_request(self, request: InferenceRequest, *, traceparent: str | None = None) -> str:
        self.requests.append(request)
        return request.request_id

    def publish(self, topic: str, key: str, record: AvroRecord) -> None:
        self.records.append((topic, key, record))

    def cancel(self, request_id: str, reason: str = "") -> None:
        self.cancelled.append(request_id)

    def flush(self, timeout: float = 30.0) -> None:
        pass


class MemoryResults:
    """A stand-in for ClickHouse's deduplicated results table, answering the batch queries."""

    def __init__(self) -> None:
        self.rows: dict[str, InferenceResult] = {}
        self.at_risk: set[str] = set()  # request ids said at_risk

    def __call__(self, sql: str, params: dict[str, Any] | None) -> QueryResult:
        params = params or {}
        if "'at_risk'" in sql:
            counts = {b: sum(1 for rid in self.at_risk if rid.rsplit("-", 1)[0] == b) for b in params["ids"]}
            return QueryResult(["batch_id", "n"], [[b, n] for b, n in counts.items() if n])
        if "countIf" in sql:
            ids = params["ids"]
            rows = [
                [
                    b,
                    sum(r.status is ResultStatus.SUCCEEDED for r in self._of(b)),
                    sum(r.status is ResultStatus.FAILED for r in self._of(b)),
                ]
                for b in ids
            ]
            return QueryResult(["batch_id", "ok", "bad"], rows)
        if "ORDER BY request_id" in sql:
            found = sorted(
                (r for r in self._of(params["b"]) if r.request_id > params["after"]), key=lambda r: r.request_id
            )
            fields = list(InferenceResult.model_fields)
            return QueryResult(fields, [[getattr(r, f) for f in fields] for r in found[:2000]])
        return QueryResult([], [])

    def _of(self, batch_id: str) -> list[InferenceResult]:
        return [r for r in self.rows.values() if r.batch_id == batch_id]

    def answer(self, request: InferenceRequest, ok: bool = True) -> None:
        t = utcnow()
        self.rows[request.request_id] = InferenceResult.for_request(
            request,
            model="m",
            status=ResultStatus.SUCCEEDED if ok else ResultStatus.FAILED,
            started_at=t,
            output_text="answer",
            error=None if ok else "engine_error: boom",
        )
