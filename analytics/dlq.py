"""The dead-letter workflow: list, show and replay dead letters.

Dead letters live on the dead-letter topic and, through the sink, in ClickHouse, which is the
index the commands filter on (reason, model, tenant, age). A replay publishes the original request
again as a new request:

* its id is derived from the dead letter (``replay-<sha1(dead_letter_id)>``) and its
  ``replay_of`` names the original request, so lineage is kept;
* it is **idempotent**: a dead letter whose replay already has a result is skipped, and the
  replay carries the idempotency key ``replay:<dead_letter_id>``, so two replays racing each other
  are deduplicated by the router;
* ``--to-model`` sends it to another model (for example after ``unknown_model``); the original
  deadline is dropped (it has usually passed) and the attempt count starts again.

A replay that fails again produces a new dead letter; replaying that one is a new replay.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from analytics.query import Query
from core.errors import ConfigError, SluiceError
from schemas import InferenceRequest, ResultStatus, Serde, utcnow

__all__ = [
    "DlqFilter",
    "ReplayOutcome",
    "RequestPublisher",
    "list_dead_letters",
    "parse_age",
    "replay",
    "replay_id",
    "show_dead_letter",
]

logger = logging.getLogger(__name__)

_AGE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class RequestPublisher(Protocol):
    """What a replay publishes through (``producers.SluiceClient`` is one)."""

    def submit_request(self, request: InferenceRequest) -> str: ...

    def flush(self, timeout: float = ...) -> None: ...


def parse_age(text: str) -> timedelta:
    m = _AGE.match(text.strip())
    if not m:
        raise ConfigError(f"age {text!r} must look like 30s, 15m, 2h or 7d")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def replay_id(dead_letter_id: str) -> str:
    return "replay-" + hashlib.sha1(dead_letter_id.encode()).hexdigest()[:24]


@dataclass
class DlqFilter:
    reason: str | None = None
    model: str | None = None
    tenant: str | None = None
    since: timedelta | None = None
    ids: list[str] = field(default_factory=list)
    # Only the dead letters of this batch's requests (``sluice dlq replay --batch``).
    batch_id: str | None = None

    def where(self, database: str = "sluice") -> tuple[str, dict[str, Any]]:
        clauses, params = ["1"], {}
        for column in ("reason", "model", "tenant"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = {{{column}:String}}")
                params[column] = value
        if self.since is not None:
            clauses.append("created_at >= now64(3) - toIntervalSecond({since_s:UInt64})")
            params["since_s"] = int(self.since.total_seconds())
        if self.ids:
            clauses.append("dead_letter_id IN {ids:Array(String)}")
            params["ids"] = self.ids
        if self.batch_id is not None:
            clauses.append(
                f"request_id IN (SELECT request_id FROM {database}.results FINAL WHERE batch_id = {{batch_id:String}})"
            )
            params["batch_id"] = self.batch_id
        return " AND ".join(clauses), params


_COLUMNS = (
    "dead_letter_id, created_at, reason, stage, request_id, tenant, model, priority, attempt, "
    "source_topic, source_partition, source_offset, error"
)


def list_dead_letters(query: Query, f: DlqFilter, database: str, limit: int = 100) -> list[dict[str, Any]]:
    where, params = f.where(database)
    res = query(
        f"SELECT {_COLUMNS} FROM {database}.dead_letters FINAL WHERE {where} ORDER BY created_at LIMIT {int(limit)}",
        params,
    )
    return res.dicts()


def show_dead_letter(query: Query, dead_letter_id: str, serde: Serde, database: str) -> dict[str, Any] | None:
    res = query(
        f"SELECT {_COLUMNS}, hex(original) AS original_hex FROM {database}.dead_letters FINAL "
        "WHERE dead_letter_id = {id:String}",
        {"id": dead_letter_id},
    )
    rows = res.dicts()
    if not rows:
        return None
    row = rows[0]
    original = bytes.fromhex(row.pop("original_hex"))
    row["original_bytes"] = len(original)
    try:
        row["original_request"] = serde.decode(InferenceRequest, original).model_dump(mode="json")
    except SluiceError as exc:
        row["original_request"] = None
        row["original_undecodable"] = str(exc)
        row["original_hex_head"] = original[:64].hex()
    row["replay_request_id"] = replay_id(row["dead_letter_id"])
    return row


@dataclass(frozen=True)
class ReplayOutcome:
    dead_letter_id: str
    action: str  # "replayed", "would replay", "skipped"
    request_id: str | None
    detail: str


def replay(
    query: Query,
    client: RequestPublisher,
    serde: Serde,
    f: DlqFilter,
    *,
    to_model: str | None = None,
    dry_run: bool = False,
    limit: int = 10_000,
    database: str,
) -> list[ReplayOutcome]:
    where, params = f.where(database)
    if f.reason is None:
        where += " AND reason != 'cancelled'"  # a cancellation is a decision, not a failure
    rows = query(
        f"SELECT dead_letter_id, reason, request_id, hex(original) AS original_hex "
        f"FROM {database}.dead_letters FINAL WHERE {where} ORDER BY created_at LIMIT {int(limit)}",
        params,
    ).dicts()
    replays = {replay_id(r["dead_letter_id"]): r["dead_letter_id"] for r in rows}
    done = {
        r["request_id"]: r["status"]
        for r in query(
            f"SELECT request_id, status FROM {database}.results FINAL WHERE request_id IN {{ids:Array(String)}}",
            {"ids": list(replays)},
        ).dicts()
    }
    outcomes: list[ReplayOutcome] = []
    for row in rows:
        dl_id = row["dead_letter_id"]
        new_id = replay_id(dl_id)
        if new_id in done:
            detail = f"already replayed as {new_id} ({done[new_id]})"
            if done[new_id] == ResultStatus.FAILED:
                detail += "; replay that request's own dead letter to try again"
            outcomes.append(ReplayOutcome(dl_id, "skipped", new_id, detail))
            continue
        try:
            original = serde.decode(InferenceRequest, bytes.fromhex(row["original_hex"]))
        except SluiceError as exc:
            outcomes.append(ReplayOutcome(dl_id, "skipped", None, f"original is not a replayable request: {exc}"))
            continue
        request = original.model_copy(
            update={
                "request_id": new_id,
                "replay_of": original.replay_of or original.request_id,
                "model": to_model or original.model,
                "attempt": 0,
                "created_at": utcnow(),
                "deadline": None,
                "idempotency_key": f"replay:{dl_id}",
                "route": None,
                "dedupe_key": None,
                "metadata": {**original.metadata, "replayed_dead_letter": dl_id},
            }
        )
        if dry_run:
            outcomes.append(
                ReplayOutcome(dl_id, "would replay", new_id, f"{row['reason']} → {request.model or 'routed'}")
            )
            continue
        client.submit_request(request)
        outcomes.append(ReplayOutcome(dl_id, "replayed", new_id, f"{row['reason']} → {request.model or 'routed'}"))
    if not dry_run:
        client.flush()
    return outcomes
