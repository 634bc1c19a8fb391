"""A GPU consumer: batch-consume one model's topics into the engine, publish results.

Guarantees: results, cost metrics and dead letters are produced with ``acks=all`` and
idempotence, and the source offsets are committed only after every one of them has been
acknowledged by the broker. A crash therefore re-runs at most the unacknowledged work, and the
ClickHouse tables dedupe by request id. Per-request failures become failed results plus dead
letters (as vLLM's run_batch turns errors into records); the loop itself never dies on input.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from gpu_consumers.buffer import Buffered, PriorityBuffer
from gpu_consumers.cancellations import CancelWatch
from gpu_consumers.engine import Engine, EngineOutput, EngineRequest, run_isolating
from gpu_consumers.offsets import OffsetTracker
from schemas import (
    AvroRecord,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestState,
    RequestStatus,
    ResultStatus,
    Serde,
    Stage,
    utcnow,
)
from sluice import clients
from sluice.catalog import Catalog, ModelEntry
from sluice.errors import BrokerError, DeadLetterReason, PipelineRejection
from sluice.metrics import BATCH_SIZE, ENGINE_SECONDS, REQUESTS
from sluice.settings import Settings
from sluice.topics import PRIORITIES, Topics, message_coords

__all__ = ["BatchReport", "GpuWorker"]

logger = logging.getLogger(__name__)


@dataclass
class BatchReport:
    batch_id: str
    size: int
    engine_seconds: float
    results: list[InferenceResult] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)


class GpuWorker:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        model: str,
        engine: Engine,
        *,
        serde: Serde | None = None,
        aging_s: float = 30.0,
        on_batch: Callable[[BatchReport], None] | None = None,
        watch_cancellations: bool = True,
    ) -> None:
        entry = catalog.get(model)
        if entry is None:
            raise PipelineRejection(DeadLetterReason.UNKNOWN_MODEL, f"{model} not in catalog")
        self.settings = settings
        self.entry: ModelEntry = entry
        self.baseline = catalog.most_capable()
        self.engine = engine
        self.topics = Topics(settings.topic_prefix)
        self.serde = serde or clients.serde(settings)
        es = settings.engine
        self.max_batch = es.max_batch_size
        self.batch_wait_s = es.batch_wait_ms / 1000
        self.buffer = PriorityBuffer(capacity_per_priority=4 * self.max_batch, aging_s=aging_s)
        self.tracker = OffsetTracker()
        self.on_batch = on_batch
        self.group_id = f"{settings.topic_prefix}gpu-{entry.name}"
        self._consumer: Consumer | None = None
        self._producer = clients.producer(settings.kafka, f"gpu-{entry.name}", **{"linger.ms": 2})
        self._assigned: dict[Priority, set[tuple[str, int]]] = {p: set() for p in PRIORITIES}
        self._paused: set[Priority] = set()
        self._rewound: dict[tuple[str, int], int] = {}
        self._rejects: list[tuple[tuple[str, int], int, AvroRecord, str | None]] = []
        self._delivery_errors: list[str] = []
        self.batches_run = 0
        self.watch_cancellations = watch_cancellations
        self.cancels: CancelWatch | None = None

    # -- Kafka plumbing -------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        for p in parts:
            self._assigned[self._priority_of(p.topic)].add((p.topic, p.partition))
        logger.info("assigned %s", [(p.topic, p.partition) for p in parts])

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        # Buffered requests on revoked partitions are released uncommitted: the new owner
        # fetches them again from the last committed offset.
        dropped = self.buffer.drop(tps)
        self._commit(consumer, only=tps)
        self.tracker.forget(list(tps))
        for tp in tps:
            self._rewound.pop(tp, None)
        for pr in PRIORITIES:
            self._assigned[pr] -= tps
        logger.info("revoked %s (released %d buffered)", sorted(tps), dropped)

    def _priority_of(self, topic: str) -> Priority:
        return Priority(topic.rsplit(".", 1)[-1])

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _produce(
        self,
        topic: str,
        key: str | None,
        record: AvroRecord,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        value = self.serde.encode(record)
        while True:
            try:
                self._producer.produce(
                    topic,
                    key=key.encode() if key else None,
                    value=value,
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.05)

    def _flush_or_raise(self) -> None:
        remaining = self._producer.flush(60)
        errors, self._delivery_errors = self._delivery_errors, []
        if remaining or errors:
            # Not committing is the safe outcome: the batch is re-run after a restart.
            raise BrokerError(f"results not acknowledged ({remaining} pending): {errors[:3]}")

    def _commit(self, consumer: Consumer, only: set[tuple[str, int]] | None = None) -> None:
        positions = self.tracker.committable()
        if only is not None:
            positions = {tp: pos for tp, pos in positions.items() if tp in only}
        if not positions:
            return
        offsets = [TopicPartition(t, p, pos) for (t, p), pos in positions.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # A commit lost to a rebalance only means re-delivery; results stay idempotent.
            logger.warning("offset commit failed (%s); work may be re-delivered", exc)
            return
        self.tracker.mark_committed(positions)

    def _backpressure(self, consumer: Consumer) -> None:
        for pr in PRIORITIES:
            rank = pr.rank
            tps = [TopicPartition(t, p) for t, p in self._assigned[pr]]
            if pr not in self._paused and self.buffer.full(rank) and tps:
                consumer.pause(tps)
                self._paused.add(pr)
            elif pr in self._paused and self.buffer.has_room(rank):
                if tps:
                    consumer.resume(tps)
                for t, p in self._assigned[pr]:
                    self._rewound.pop((t, p), None)
                self._paused.discard(pr)

    def _rewind(self, consumer: Consumer, tp: tuple[str, int], offset: int) -> bool:
        """Hand a message back to the broker: pause its partition and seek to it.

        Pausing alone is not enough: the client has usually prefetched far beyond the buffer
        bound already, and those messages would queue ahead of newly fetched high-priority ones
        (and hold memory). Seeking drops the prefetched tail; it is fetched again on resume.
        """
        try:
            consumer.pause([TopicPartition(*tp)])
            consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.debug("cannot rewind %s to %d (%s); buffering it instead", tp, offset, exc)
            return False
        self._rewound[tp] = offset
        self._paused.add(self._priority_of(tp[0]))
        return True

    # -- Admission --------------------------------------------------------------------------
    def _admit(self, consumer: Consumer, msg: Message) -> None:
        topic, partition, offset = message_coords(msg)
        tp = (topic, partition)
        rewound = self._rewound.get(tp)
        if rewound is not None and offset >= rewound:
            return  # prefetched past a rewind: it will be fetched again
        if self.buffer.full(self._priority_of(topic).rank) and self._rewind(consumer, tp, offset):
            return
        self.tracker.fetched(tp, offset)
        value = msg.value() or b""
        try:
            request = self.serde.decode(InferenceRequest, value)
        except PipelineRejection as exc:
            dl = self._dead_letter(exc.reason, exc.detail, tp, offset, value, None)
            self._rejects.append((tp, offset, dl, None))
            return
        self.buffer.add(Buffered(tp[0], tp[1], offset, value, request, time.monotonic()))

    def _dead_letter(
        self,
        reason: DeadLetterReason,
        error: str,
        tp: tuple[str, int],
        offset: int,
        value: bytes,
        request: InferenceRequest | None,
    ) -> DeadLetter:
        return DeadLetter.from_event(
            reason,
            error,
            stage=Stage.CONSUMER,
            topic=tp[0],
            partition=tp[1],
            offset=offset,
            original=value,
            request=request,
            model=self.entry.name,
        )

    # -- Batches ------------------------------------------------------------------------------
    def _batch_due(self) -> bool:
        if len(self.buffer) >= self.max_batch:
            return True
        oldest = self.buffer.oldest_arrival()
        return oldest is not None and time.monotonic() - oldest >= self.batch_wait_s

    def run_batch(self, consumer: Consumer) -> BatchReport | None:
        items = self.buffer.take(self.max_batch, utcnow())
        if not items and not self._rejects:
            return None
        batch_id = uuid.uuid4().hex[:16]
        started = utcnow()
        report = BatchReport(batch_id=batch_id, size=len(items), engine_seconds=0.0)
        runnable: list[Buffered] = []
        if items and self.cancels is not None:
            self.cancels.poll()
        for it in items:
            cancelled = self.cancels.reason(it.request.request_id) if self.cancels is not None else None
            if cancelled is not None:
                self._fail(it, started, report, DeadLetterReason.CANCELLED, cancelled)
            elif it.request.deadline is not None and it.request.deadline <= started:
                self._fail(
                    it,
                    started,
                    report,
                    DeadLetterReason.DEADLINE_EXPIRED,
                    f"deadline {it.request.deadline.isoformat()} passed before the batch ran",
                )
            else:
                runnable.append(it)
        for it in runnable:
            self._status(it.request.request_id, RequestState.RUNNING, f"batch {batch_id} of {len(runnable)}")
        # Not flushed here: "running" is advisory and rides along with the batch's results.
        self._producer.poll(0)
        engine_reqs = [
            EngineRequest(
                request_id=it.request.request_id,
                messages=[m.model_dump() for m in it.request.messages],
                max_tokens=it.request.max_tokens,
                temperature=it.request.temperature,
                top_p=it.request.top_p,
                seed=it.request.seed,
                priority=it.rank,
                attempt=it.request.attempt,
            )
            for it in runnable
        ]
        t0 = time.monotonic()
        outputs = run_isolating(self.engine, engine_reqs)
        report.engine_seconds = time.monotonic() - t0
        total_tokens = sum(o.prompt_tokens + o.completion_tokens for o in outputs) or 1
        for it, out in zip(runnable, outputs, strict=True):
            if out.error is not None:
                reason = DeadLetterReason(out.error_kind or "engine_error")
                if reason is DeadLetterReason.ENGINE_ERROR:
                    self._retry_or_fail(it, started, report, out)
                else:
                    self._fail(it, started, report, reason, out.error, out)
                continue
            share = (out.prompt_tokens + out.completion_tokens) / total_tokens
            self._succeed(it, out, started, report, batch_id, share, len(runnable))
        for _tp, _offset, dl, key in self._rejects:
            self._produce(self.topics.dead_letter, key, dl)
            assert isinstance(dl, DeadLetter)
            report.dead_letters.append(dl)
        self._flush_or_raise()
        for it in items:
            self.tracker.done((it.topic, it.partition), it.offset)
        for tp, offset, _, _ in self._rejects:
            self.tracker.done(tp, offset)
        self._rejects.clear()
        self._commit(consumer)
        self.batches_run += 1
        BATCH_SIZE.labels(self.entry.name).observe(len(runnable))
        ENGINE_SECONDS.labels(self.entry.name).observe(report.engine_seconds)
        for r in report.results:
            REQUESTS.labels(self.entry.name, r.status).inc()
        if self.on_batch:
            self.on_batch(report)
        return report

    def _succeed(
        self,
        it: Buffered,
        out: EngineOutput,
        started: datetime,
        report: BatchReport,
        batch_id: str,
        share: float,
        batch_size: int,
    ) -> None:
        req = it.request
        result = InferenceResult.for_request(
            req,
            model=self.entry.name,
            status=ResultStatus.SUCCEEDED,
            started_at=started,
            output_text=out.text,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            batch_id=batch_id,
        )
        metric = CostMetric.for_result(
            result,
            engine_ms=report.engine_seconds * 1000 * share,
            cost_usd=self.entry.cost_usd(out.prompt_tokens, out.completion_tokens),
            baseline_cost_usd=self.baseline.cost_usd(out.prompt_tokens, out.completion_tokens),
            batch_id=batch_id,
            batch_size=batch_size,
        )
        self._produce(self.topics.results, req.request_id, result)
        self._produce(self.topics.cost_metrics, req.request_id, metric)
        self._status(req.request_id, RequestState.SUCCEEDED, f"batch {batch_id}")
        report.results.append(result)

    def _fail(
        self,
        it: Buffered,
        started: datetime,
        report: BatchReport,
        reason: DeadLetterReason,
        error: str,
        out: EngineOutput | None = None,
    ) -> None:
        result = InferenceResult.failed(
            it.request,
            reason,
            error,
            model=self.entry.name,
            started_at=started,
            prompt_tokens=out.prompt_tokens if out else 0,
            batch_id=report.batch_id,
        )
        dl = self._dead_letter(reason, error, (it.topic, it.partition), it.offset, it.value, it.request)
        self._produce(self.topics.results, it.request.request_id, result)
        self._produce(self.topics.dead_letter, it.request.request_id, dl)
        self._status(it.request.request_id, reason.state, f"{reason.value}: {error}")
        report.results.append(result)
        report.dead_letters.append(dl)

    def _max_attempts(self, request: InferenceRequest) -> int:
        wanted = request.metadata.get("max_attempts", "")
        return int(wanted) if wanted.isdigit() and int(wanted) >= 1 else self.settings.retry.max_attempts

    def _retry_or_fail(self, it: Buffered, started: datetime, report: BatchReport, out: EngineOutput) -> None:
        """Transient engine failure: back to a delay topic (the partition keeps flowing), or a
        dead letter once the attempts are used up."""
        req = it.request
        max_attempts = self._max_attempts(req)
        error = out.error or "engine error"
        if req.attempt + 1 >= max_attempts:
            reason = DeadLetterReason.RETRIES_EXHAUSTED if max_attempts > 1 else DeadLetterReason.ENGINE_ERROR
            self._fail(it, started, report, reason, f"engine_error after {req.attempt + 1} attempt(s): {error}", out)
            return
        backoff = self.settings.retry.backoff_ms
        level = min(req.attempt, len(backoff) - 1)
        retry = req.model_copy(update={"attempt": req.attempt + 1})
        self._produce(self.topics.retry(level), req.request_id, retry, [("target", it.topic.encode())])
        self._status(
            req.request_id,
            RequestState.QUEUED,
            f"retry {req.attempt + 1} of {max_attempts - 1} in {backoff[level] / 1000:g}s after: {error}",
        )
        report.retried.append(req.request_id)

    def _status(self, request_id: str, state: RequestState, detail: str | None = None) -> None:
        if self.settings.publish_status:
            rec = RequestStatus.of(request_id, state, model=self.entry.name, detail=detail)
            self._produce(self.topics.status, request_id, rec)

    # -- Loop ---------------------------------------------------------------------------------
    def _drain(self, consumer: Consumer, poll_s: float, chunk: int = 500, max_chunks: int = 20) -> None:
        """Take in everything the client has prefetched before the next batch forms.

        A full buffer rewinds its partitions (see ``_rewind``), so draining mostly discards
        prefetched backlog, quickly; a high-priority request fetched behind that backlog then
        reaches the buffer before the next batch instead of several batches later.
        """
        msgs = consumer.consume(num_messages=chunk, timeout=poll_s)
        for _ in range(max_chunks):
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        logger.warning("consume error: %s", err)
                    continue
                self._admit(consumer, msg)
            if len(msgs) < chunk:
                return
            msgs = consumer.consume(num_messages=chunk, timeout=0)

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        # A small prefetch queue keeps memory flat however deep the backlog is (the buffer is the
        # real queue).
        consumer = clients.consumer(
            self.settings.kafka,
            f"gpu-{self.entry.name}",
            self.group_id,
            **{
                "queued.max.messages.kbytes": 512,
                "fetch.max.bytes": 1 << 20,
                "max.partition.fetch.bytes": 128 << 10,
                # librdkafka postpones a partition's next fetch by this much (default 1 s) once
                # the prefetch queue is over its bound; with the bound this small that would
                # stall newly arriving high-priority requests behind rewound backlog.
                "fetch.queue.backoff.ms": 10,
            },
        )
        self._consumer = consumer
        if self.watch_cancellations:
            self.cancels = CancelWatch(self.settings, self.serde)
        consumer.subscribe(
            self.topics.model_topics(self.entry.name),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        poll_s = min(0.05, self.batch_wait_s) or 0.01
        logger.info("gpu worker for %s consuming as %s", self.entry.name, self.group_id)
        try:
            while not stop.is_set():
                self._drain(consumer, poll_s)
                if ready is not None and any(self._assigned.values()):
                    ready.set()
                self._backpressure(consumer)
                if self._batch_due() or (self._rejects and not len(self.buffer)):
                    self.run_batch(consumer)
        finally:
            # Graceful stop: the in-flight batch has finished (batches are synchronous); buffered
            # requests are released uncommitted for whoever owns their partitions next.
            self._commit(consumer)
            consumer.close()
            if self.cancels is not None:
                self.cancels.close()
            self._producer.flush(10)
            logger.info("gpu worker for %s stopped after %d batches", self.entry.name, self.batches_run)
