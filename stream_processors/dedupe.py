"""Dedupe and the exact-match response cache, over one keyed table.

The Faust app keeps the table (a ``faust.Table`` with a compacted changelog, so it survives
restarts); this module is the logic over any ``MutableMapping``, so unit tests use a dict.

Events about one key meet on one table partition and are seen in order by one worker: requests
on the request-topic partition of that number (where Sluice's producers put them,
``stream_processors.colocate``) or, from other producers, on the dedupe topic keyed by the dedupe
key, and completions on the dedupe topic:

* a routed **request**: the first with its key runs (forwarded to its model topic); later ones
  while it is in flight are attached to it; later ones after it succeeded are answered from the
  stored result (an idempotency-key repeat as a duplicate, a content repeat as a cache hit);
* a **completion** (the original's result, tapped from the results topic): every attached
  duplicate gets its own result (own request id, ``deduplicated_from`` set), and a successful
  result is kept for the cache TTL;
* a **tick** (sent to each partition by the leader's timer): expired entries of that partition
  are deleted, and the oldest are evicted beyond the per-partition bound.

Entries record their partition because a table write must go to the changelog partition of the
event being processed: a sweep only touches entries of the tick's own partition.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import MutableMapping
from typing import Any

from core.headers import Headers, carried
from core.kafka import Out
from core.settings import ProcessorSettings
from schemas import CacheKind, InferenceRequest, InferenceResult, RequestState, ResultStatus
from stream_processors.emit import Emitter
from stream_processors.router import Backlog
from stream_processors.semantic import SemanticStage

__all__ = ["DedupeStage"]

logger = logging.getLogger(__name__)

Entry = dict[str, Any]


def _attached(request: InferenceRequest, raw: bytes, headers: Headers | None) -> Entry:
    """A duplicate waiting on its original: the request record as it arrived (so it can still run
    on its own if its original never completes) and its trace context, tenant and correlation id
    for the answer it gets later."""
    return {
        "request_id": request.request_id,
        "raw": base64.b64encode(raw).decode(),
        "headers": [[k, v.decode(errors="replace")] for k, v in carried(headers)],
    }


def _headers(attached: Entry) -> Headers:
    # .get: duplicates attached by an earlier release may have none.
    return [(k, v.encode()) for k, v in attached.get("headers", [])]


class DedupeStage:
    def __init__(
        self,
        table: MutableMapping[str, Entry],
        emitter: Emitter,
        settings: ProcessorSettings,
        backlog: Backlog | None = None,
        clock: Any = time.time,
        semantic: SemanticStage | None = None,
    ) -> None:
        self.table = table
        # Where a first request goes before its model topic when it may be answered semantically.
        self.semantic = semantic
        self.emit = emitter
        self.settings = settings
        self.backlog = backlog or Backlog()
        self.clock = clock
        # Entries written before this process started were recovered from the changelog. A
        # recovered "running" entry may be stale (its completion handled just before a crash, or
        # a broker that reports a short changelog), so duplicates do not wait on it: they run.
        self.started_at: float = clock()

    # -- requests -------------------------------------------------------------------------
    def on_request(
        self, request: InferenceRequest, raw: bytes, partition: int, headers: Headers | None = None
    ) -> list[Out]:
        headers = carried(headers)
        key = request.dedupe_key
        assert key is not None and request.route is not None
        now = self.clock()
        entry = self.table.get(key)
        if entry is not None and self._expired(entry, now):
            entry = None
        if entry is None or (entry["original"] == request.request_id and entry["state"] == "running"):
            # A new key, or the original redelivered after a restart: (re)forward it. Skipping a
            # redelivered original could lose it if the first forward was never acknowledged.
            self.table[key] = {
                "original": request.request_id,
                "state": "running",
                "p": partition,
                "at": now,
                "waiters": entry["waiters"] if entry else [],
                "result": None,
            }
            return self._forward(request, raw, headers)
        if entry["original"] == request.request_id:
            return []  # the original redelivered after it completed: its result exists
        if entry["state"] == "running" and entry["at"] < self.started_at:
            logger.info(
                "%s: in flight since before this router started; running %s on its own", key, request.request_id
            )
            return self._forward(request, raw, headers)
        if entry["state"] == "running":
            if all(w["request_id"] != request.request_id for w in entry["waiters"]):
                entry = {**entry, "waiters": [*entry["waiters"], _attached(request, raw, headers)]}
                self.table[key] = entry
            return self.emit.status(
                request.request_id,
                RequestState.DEDUPLICATED,
                model=request.route.model,
                detail=f"attached to {entry['original']}",
            )
        # Done: answer from the stored result without touching a model topic.
        cached = key.startswith("content:")
        result = InferenceResult.answered_from(
            request, entry["result"], original=entry["original"], cache_kind=CacheKind.EXACT if cached else None
        )
        return self.emit.result(result, cached=cached, deduplicated=not cached, headers=headers)

    def _forward(self, request: InferenceRequest, raw: bytes, headers: Headers | None = None) -> list[Out]:
        assert request.route is not None
        if self.semantic is not None and self.semantic.eligible(request):
            local = self.semantic.try_local(request, raw, headers)
            if local is not None:
                return local
            scope = self.semantic.scope(request.tenant).encode()
            kind = [*carried(headers), ("kind", b"request")]
            partition = self.semantic.partition_of(request.tenant)
            return [Out(self.emit.topics.semantic, scope, request, kind, partition=partition, encoded=raw)]
        model = request.route.model
        self.backlog.routed(model, request.request_id, priority=request.priority)
        topic = self.emit.topics.model(model, request.priority)
        fwd = Out(topic, request.request_id, request, list(headers or []), encoded=raw)
        return [
            fwd,
            *self.emit.status(request.request_id, RequestState.ROUTED, model=model, detail=request.route.reason),
        ]

    # -- completions ----------------------------------------------------------------------
    def on_completed(self, result: InferenceResult) -> list[Out]:
        key = result.dedupe_key
        assert key is not None
        entry = self.table.get(key)
        if entry is None or entry["original"] != result.request_id or entry["state"] != "running":
            return []  # stale, or a redelivered completion already handled
        out: list[Out] = []
        stored = result.stored()
        for w in entry["waiters"]:
            answer = InferenceResult.answered_from(self._request(w), stored, original=result.request_id)
            out += self.emit.result(answer, deduplicated=True, headers=_headers(w))
        if result.status is ResultStatus.SUCCEEDED:
            self.table[key] = {**entry, "state": "done", "at": self.clock(), "waiters": [], "result": stored}
        else:
            # Failures are not cached: the next identical request runs again.
            del self.table[key]
        return out

    def _request(self, attached: Entry) -> InferenceRequest:
        return self.emit.serde.decode(InferenceRequest, base64.b64decode(attached["raw"]))

    # -- bounding -------------------------------------------------------------------------
    def _expired(self, entry: Entry, now: float) -> bool:
        ttl = self.settings.inflight_ttl_s if entry["state"] == "running" else self.settings.cache_ttl_s
        return bool(now - entry["at"] > ttl)

    def sweep(self, partition: int) -> list[Out]:
        """Delete this partition's expired entries, then evict its oldest cached results beyond
        the bound. Duplicates still attached to an expired in-flight original run on their own."""
        now = self.clock()
        mine = [(k, e) for k, e in list(self.table.items()) if e["p"] == partition]
        doomed = {k for k, e in mine if self._expired(e, now)}
        done = sorted(((e["at"], k) for k, e in mine if k not in doomed and e["state"] == "done"), reverse=True)
        room = max(0, self.settings.max_entries_per_partition - (len(mine) - len(doomed) - len(done)))
        doomed.update(k for _, k in done[room:])
        out: list[Out] = []
        for k in doomed:
            entry = self.table.pop(k)
            for w in entry["waiters"]:
                request = self._request(w)
                assert request.route is not None
                logger.warning(
                    "original %s of %s did not complete in time; running it alone", entry["original"], w["request_id"]
                )
                self.backlog.routed(request.route.model, request.request_id, priority=request.priority)
                topic = self.emit.topics.model(request.route.model, request.priority)
                out.append(Out(topic, request.request_id, request, _headers(w), encoded=base64.b64decode(w["raw"])))
        if doomed:
            logger.debug("dedupe sweep of partition %d removed %d entries", partition, len(doomed))
        return out
