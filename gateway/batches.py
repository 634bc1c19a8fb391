"""Batches: a set of requests under one id, with OpenAI's lifecycle and one output or error line
for every input line.

* **create**: the input file is streamed line by line; each line becomes a request with a
  deterministic id (``<batch id>-<line index>``), so re-validating after a crash republishes the
  same requests rather than new ones. A line Sluice cannot run becomes a failed result at once
  (vLLM ``run_batch`` style), so it is counted like every other line.
* **progress**: counted from the results in ClickHouse (deduplicated by request id), for every
  open batch each ``batch_poll_s``; each change is published to the compacted batch-status topic,
  which the sink writes to the ``batches`` table.
* **finalizing**: when every line has a result (or the completion window plus a grace period has
  passed, or a cancel has had that long), the output and error files are written by walking the
  input file and the results in request-id order side by side: memory stays flat at any size.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import IO, Any, Protocol

from analytics.dlq import parse_age
from analytics.lookups import Lookups
from analytics.query import Query
from analytics.results import error_line, output_line
from core.errors import ConfigError, SluiceError
from core.settings import Settings
from core.topics import Topics
from gateway.files import FileMeta, FileStore, delete_expired, iter_lines
from gateway.openai_format import LineError, parse_batch_line
from schemas import (
    QUOTA_KEY,
    QUOTA_KEY_TOKENS,
    AvroRecord,
    BatchState,
    BatchStatus,
    DeadLetterReason,
    Endpoint,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestIdentity,
    new_id,
    utcnow,
)

__all__ = [
    "BatchError",
    "BatchNotFound",
    "BatchService",
    "QuotaExceeded",
    "Submitter",
    "parse_window",
    "request_id_for",
]

logger = logging.getLogger(__name__)

# How often expired files are deleted (an expired file answers 404 at once regardless).
_SWEEP_S = 10.0


class BatchError(SluiceError):
    """A batch request the gateway refuses (HTTP 400)."""


class BatchNotFound(BatchError):
    """No such batch or file for this tenant (HTTP 404: another tenant's look the same)."""


class QuotaExceeded(BatchError):
    """The tenant has too many requests queued (HTTP 429)."""


class Submitter(Protocol):
    """What the gateway publishes through (``producers.SluiceClient``)."""

    def submit_request(self, request: InferenceRequest, *, traceparent: str | None = None) -> str: ...

    def publish(self, topic: str, key: str, record: AvroRecord) -> None: ...

    def cancel(self, request_id: str, reason: str = ...) -> None: ...

    def flush(self, timeout: float = ...) -> None: ...


MAX_WINDOW = timedelta(days=30)


def parse_window(text: str) -> timedelta:
    try:
        window = parse_age(text)
    except (ConfigError, OverflowError, ValueError):
        window = timedelta(0)
    if window <= timedelta(0):
        raise BatchError(f"completion_window {text!r} must look like 24h, 90m or 7d")
    if window > MAX_WINDOW:
        raise BatchError(f"completion_window {text!r} is longer than {MAX_WINDOW.days} days")
    return window


def request_id_for(batch_id: str, index: int) -> str:
    # Zero-padded: request-id order is line order (the output walk relies on it).
    return f"{batch_id}-{index:06d}"


class BatchService:
    def __init__(self, settings: Settings, files: FileStore, publisher: Submitter, query: Query | None) -> None:
        self.settings = settings
        self.files = files
        self.publisher = publisher
        self.lookups = Lookups(query, settings.clickhouse.database) if query is not None else None
        self.topics = Topics(settings.topic_prefix)
        self._lock = threading.Lock()
        self._batches: dict[str, BatchStatus] = {}
        self._threads: list[threading.Thread] = []
        # Metadata every line's request carries (the API key's quota), while this gateway ingests
        # the batch (a batch taken over after a restart is ingested without it).
        self._line_metadata: dict[str, dict[str, str]] = {}

    # -- the calls --------------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        input_file_id: str,
        *,
        endpoint: str = Endpoint.CHAT_COMPLETIONS,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        priority: Priority | str = Priority.LOW,
        webhook_url: str | None = None,
        output_expires_after_s: int | None = None,
        request_metadata: dict[str, str] | None = None,
    ) -> BatchStatus:
        meta = self.files.meta(input_file_id)
        if meta is None or meta.tenant != tenant:
            raise BatchNotFound(f"no file {input_file_id}")
        if meta.purpose != "batch":
            raise BatchError(f"file {input_file_id} has purpose {meta.purpose!r}; a batch needs purpose 'batch'")
        if endpoint not in Endpoint._value2member_map_:
            raise BatchError(f"endpoint {endpoint!r} is not supported; use one of {', '.join(Endpoint)}")
        window = parse_window(completion_window)
        try:
            prio = Priority(priority)
        except ValueError:
            raise BatchError(f"priority {priority!r} is not one of high, normal, low") from None
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise BatchError("metadata must map strings to strings")
        queued = self.outstanding(tenant)
        limit = self.settings.gateway.max_queued_per_tenant
        if queued + meta.lines > limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {queued} requests queued; {meta.lines} more would pass its limit of {limit}"
            )
        now = utcnow()
        batch = BatchStatus(
            batch_id=f"batch_{new_id()}",
            tenant=tenant,
            state=BatchState.VALIDATING,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            priority=prio,
            total=meta.lines,
            webhook_url=webhook_url,
            output_expires_after_s=output_expires_after_s,
            metadata=dict(metadata or {}),
            created_at=now,
            expires_at=now + window,
            updated_at=now,
        )
        try:
            self._save(batch)
            self.publisher.flush()
        except SluiceError:
            # Not on the broker: nothing of this batch may be left listed.
            with self._lock:
                self._batches.pop(batch.batch_id, None)
            raise
        if request_metadata:
            self._line_metadata[batch.batch_id] = dict(request_metadata)
        self._spawn(self._ingest, batch, meta)
        return batch

    def get(self, tenant: str, batch_id: str) -> BatchStatus:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            batch = self._from_store(batch_id)
        if batch is None or batch.tenant != tenant:
            raise BatchNotFound(f"no batch {batch_id}")
        return batch

    def list(self, tenant: str, limit: int = 20, after: str | None = None) -> list[BatchStatus]:
        found: dict[str, BatchStatus] = {}
        if self.lookups is not None:
            found.update((b.batch_id, b) for b in self.lookups.batches_of(tenant))
        with self._lock:
            found.update((b.batch_id, b) for b in self._batches.values() if b.tenant == tenant)
        ordered = sorted(found.values(), key=lambda b: (b.created_at, b.batch_id), reverse=True)
        if after is not None:
            ids = [b.batch_id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        return ordered[:limit]

    def cancel(self, tenant: str, batch_id: str) -> BatchStatus:
        batch = self.get(tenant, batch_id)
        if batch.terminal or batch.state is BatchState.CANCELLING:
            return batch
        batch = self._save(batch.moved(BatchState.CANCELLING))
        self._spawn(self._cancel_requests, batch)
        return batch

    def outstanding(self, tenant: str) -> int:
        """Requests of ``tenant``'s open batches that have no result yet."""
        with self._lock:
            return sum(
                max(0, b.total - b.completed - b.failed)
                for b in self._batches.values()
                if b.tenant == tenant and not b.terminal
            )

    # -- the background work ----------------------------------------------------------------
    def recover(self) -> int:
        """Take over the open batches recorded in ClickHouse (after a gateway restart)."""
        if self.lookups is None:
            return 0
        recovered = self.lookups.open_batches()
        for batch in recovered:
            with self._lock:
                if batch.batch_id in self._batches:
                    continue
                self._batches[batch.batch_id] = batch
            if batch.state is BatchState.VALIDATING:
                meta = self.files.meta(batch.input_file_id)
                if meta is not None:
                    self._spawn(self._ingest, batch, meta)
        return len(recovered)

    def poll_once(self) -> None:
        """Update the counts of every open batch; finalize the ones that are done or overdue."""
        with self._lock:
            open_batches = [
                b for b in self._batches.values() if b.state in (BatchState.IN_PROGRESS, BatchState.CANCELLING)
            ]
        if not open_batches or self.lookups is None:
            return
        ids = [b.batch_id for b in open_batches]
        counts, risky = self.lookups.batch_counts(ids), self.lookups.batch_at_risk(ids)
        now = utcnow()
        grace = timedelta(seconds=self.settings.gateway.expiry_grace_s)
        for batch in open_batches:
            ok, bad = counts.get(batch.batch_id, (0, 0))
            at_risk = max(batch.at_risk, risky.get(batch.batch_id, 0))
            if (ok, bad, at_risk) != (batch.completed, batch.failed, batch.at_risk):
                if at_risk > batch.at_risk:
                    logger.warning("batch %s: %d line(s) at risk of missing its window", batch.batch_id, at_risk)
                batch = self._save(
                    batch.model_copy(update={"completed": ok, "failed": bad, "at_risk": at_risk, "updated_at": now})
                )
            done = ok + bad >= batch.total
            if batch.state is BatchState.CANCELLING:
                assert batch.cancelling_at is not None
                if done or now - batch.cancelling_at > grace:
                    self._finalize(batch, BatchState.CANCELLED)
            elif done:
                self._finalize(batch, BatchState.COMPLETED)
            elif now > batch.expires_at + grace:
                self._finalize(batch, BatchState.EXPIRED)

    def run(self, stop: threading.Event) -> None:
        """Track batches until ``stop`` is set (the gateway runs this in a thread)."""
        try:
            recovered = self.recover()
            if recovered:
                logger.info("took over %d open batch(es)", recovered)
        except SluiceError as exc:
            logger.warning("cannot read open batches yet: %s", exc)
        swept = 0.0
        while not stop.wait(self.settings.gateway.batch_poll_s):
            try:
                self.poll_once()
            except SluiceError as exc:
                logger.warning("batch progress: %s", exc)
            if time.monotonic() - swept >= _SWEEP_S:
                swept = time.monotonic()
                try:
                    delete_expired(self.files)
                except (SluiceError, OSError) as exc:
                    logger.warning("expired files not deleted: %s", exc)

    def join(self, timeout: float | None = None) -> None:
        for t in list(self._threads):
            t.join(timeout)

    # -- internals --------------------------------------------------------------------------
    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=f"batch-{target.__name__}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _save(self, batch: BatchStatus) -> BatchStatus:
        with self._lock:
            self._batches[batch.batch_id] = batch
        self.publisher.publish(self.topics.batches, batch.batch_id, batch)
        return batch

    def _from_store(self, batch_id: str) -> BatchStatus | None:
        return self.lookups.batch(batch_id) if self.lookups is not None else None

    def _ingest(self, batch: BatchStatus, meta: FileMeta) -> None:
        try:
            total = self._publish_lines(batch, meta)
        except Exception as exc:
            logger.exception("batch %s failed while validating", batch.batch_id)
            self._save(batch.moved(BatchState.FAILED, error=f"cannot read {meta.id}: {exc}"))
            self.publisher.flush()
            return
        with self._lock:
            current = self._batches.get(batch.batch_id, batch)
        if current.state is BatchState.VALIDATING:
            if total == 0:
                self._save(current.moved(BatchState.FAILED, total=0, error="the input file has no requests"))
            else:
                self._save(current.moved(BatchState.IN_PROGRESS, total=total))
        self.publisher.flush()

    def _publish_lines(self, batch: BatchStatus, meta: FileMeta) -> int:
        seen: set[str] = set()
        chunk = self.settings.gateway.publish_chunk
        count = 0
        for index, line in enumerate(iter_lines(self.files.chunks(meta.id))):
            count = index + 1
            rid = request_id_for(batch.batch_id, index)
            try:
                custom_id, request = parse_batch_line(
                    line,
                    index + 1,
                    tenant=batch.tenant,
                    request_id=rid,
                    endpoint=Endpoint(batch.endpoint),
                    priority=batch.priority,
                    batch_id=batch.batch_id,
                    deadline=batch.expires_at,
                    created_at=batch.created_at,
                )
                if custom_id in seen:
                    raise LineError(f"line {index + 1}: duplicate custom_id {custom_id!r}", custom_id=custom_id)
                seen.add(custom_id or "")
                # Quota fields come from the key, never from the line.
                request.metadata.pop(QUOTA_KEY, None)
                request.metadata.pop(QUOTA_KEY_TOKENS, None)
                request.metadata.update(self._line_metadata.get(batch.batch_id, {}))
                self.publisher.submit_request(request)
            except LineError as exc:
                if exc.custom_id is not None:
                    seen.add(exc.custom_id)
                self._reject_line(batch, rid, exc)
            if (index + 1) % chunk == 0:
                # Bounded: the producer never holds more than a chunk of a large file.
                self.publisher.flush()
        self._line_metadata.pop(batch.batch_id, None)
        return count

    def _reject_line(self, batch: BatchStatus, request_id: str, exc: LineError) -> None:
        who = RequestIdentity(
            request_id=request_id,
            tenant=batch.tenant,
            priority=batch.priority,
            created_at=batch.created_at,
            batch_id=batch.batch_id,
            custom_id=exc.custom_id,
        )
        result = InferenceResult.failed(who, DeadLetterReason.VALIDATION_ERROR, str(exc), model="")
        self.publisher.publish(self.topics.results, request_id, result)

    def _cancel_requests(self, batch: BatchStatus) -> None:
        for index in range(batch.total):
            self.publisher.cancel(request_id_for(batch.batch_id, index), f"batch {batch.batch_id} cancelled")
        self.publisher.flush()

    def _results(self, batch_id: str) -> Iterator[InferenceResult]:
        assert self.lookups is not None
        return self.lookups.batch_results(batch_id)

    def _finalize(self, batch: BatchStatus, final: BatchState) -> None:
        batch = self._save(batch.moved(BatchState.FINALIZING))
        missing_code = {BatchState.EXPIRED: "batch_expired", BatchState.CANCELLED: "batch_cancelled"}.get(
            final, "server_error"
        )
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            n_out, n_err = self._write_lines(batch, out, err, missing_code)
            ids: dict[str, Any] = {}
            for fh, n, key, suffix in (
                (out, n_out, "output_file_id", "output"),
                (err, n_err, "error_file_id", "error"),
            ):
                if not n:
                    continue
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(0)
                meta = FileMeta(
                    tenant=batch.tenant,
                    filename=f"{batch.batch_id}_{suffix}.jsonl",
                    purpose="batch_output",
                    bytes=size,
                    lines=n,
                )
                retention = batch.output_expires_after_s
                meta.expire_after(retention if retention is not None else self.settings.files.retention_s)
                self.files.put(meta, fh)
                ids[key] = meta.id
        with self._lock:
            current = self._batches.get(batch.batch_id, batch)
        self._save(current.moved(final, **ids))
        self.publisher.flush()
        logger.info("batch %s %s: %d output, %d error lines", batch.batch_id, final.value, n_out, n_err)

    def _write_lines(self, batch: BatchStatus, out: IO[bytes], err: IO[bytes], missing_code: str) -> tuple[int, int]:
        results = self._results(batch.batch_id)
        nxt = next(results, None)
        n_out = n_err = 0
        for index, line in enumerate(iter_lines(self.files.chunks(batch.input_file_id))):
            rid = request_id_for(batch.batch_id, index)
            while nxt is not None and nxt.request_id < rid:
                nxt = next(results, None)  # not a line of this file (cannot happen unless ids were forged)
            if nxt is not None and nxt.request_id == rid:
                obj = output_line(nxt, endpoint=Endpoint(batch.endpoint))
                nxt = next(results, None)
            else:
                obj = error_line(
                    rid, _custom_id(line), missing_code, f"{missing_code}: no result before the batch ended"
                )
            target = out if obj["error"] is None else err
            target.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
            if obj["error"] is None:
                n_out += 1
            else:
                n_err += 1
        return n_out, n_err


def _custom_id(line: bytes) -> str | None:
    try:
        cid = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return cid if isinstance(cid, str) else None
