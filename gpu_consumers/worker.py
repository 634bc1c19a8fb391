"""A GPU consumer: keep the engine full from one model's topics, publish each request as it finishes.

The loop, on one thread:

1. take in what the client has fetched (bounded per-priority buffer, read far enough ahead of the
   engine that deadlines and fair share have a backlog to choose from; full priorities are
   paused and rewound, see ``flow``);
2. abort running requests that were cancelled or whose deadline passed (billed for the tokens
   they used);
3. admit buffered requests into the engine while it has free slots, highest effective (aged)
   priority first, each with that priority for vLLM's scheduler; a request that outranks
   everything running may take one of a few extra slots so it starts at the next free one;
4. step the engine; each finished request's result, cost metric and status are produced at once;
5. commit each partition up to its lowest request whose records are not all acknowledged.

It is a :class:`core.kafka.Handler`: the runtime's committing loop (``core.kafka.ConsumeLoop``)
does the fetching, the rebalance callbacks and the commits; this module decides what to take and
what each request becomes.

Guarantees: records are produced with ``acks=all`` and idempotence, and an offset moves only past
requests whose records the broker acknowledged. A crash re-runs at most the requests that were
in the engine or not yet acknowledged (the in-flight window), and those that finished ahead of
an earlier request of their partition (deadlines and fair share reorder a backlog); a graceful stop (SIGTERM) lets them
finish within ``drain_s``, aborts the rest uncommitted and leaves the group, so a clean stop
produces no duplicates. Per-request failures become failed results plus dead letters (as vLLM's
run_batch turns errors into records). When the engine dies as a whole, it is restarted and the
requests that were in it are rerun in halving groups until the one that killed it runs alone: it
is retried through a delay topic or dead-lettered; the others finish normally.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from core import clients
from core.catalog import Catalog, ModelEntry
from core.errors import ConfigError
from core.headers import carried
from core.kafka import (
    TP,
    ConsumeLoop,
    Handler,
    Out,
    Producer,
    ShareLoop,
    TrackedPublisher,
    TransactionalPublisher,
    message_coords,
    prepare_share_group,
)
from core.metrics import AT_RISK, ENGINE_INFLIGHT, ENGINE_SECONDS, PREEMPTED, REQUESTS, observe_records
from core.notices import at_risk_records
from core.rejections import Source
from core.settings import Settings
from core.topics import PRIORITIES, Topics
from gpu_consumers.buffer import Buffered, PriorityBuffer
from gpu_consumers.cancellations import CancelWatch
from gpu_consumers.engine import Engine, EngineDied, EngineOutput, EngineRequest
from gpu_consumers.flow import PartitionFlow
from gpu_consumers.inflight import InFlight, Running
from gpu_consumers.outcomes import Outcomes
from gpu_consumers.pace import DecodePace
from schemas import DeadLetterReason, InferenceRequest, PipelineRejection, Priority, RequestState, Serde, utcnow

__all__ = ["GpuWorker"]

logger = logging.getLogger(__name__)

# Requests read ahead per priority by default: a backlog this deep is ordered by deadline and
# shared fairly between tenants; what lies beyond waits in the log in arrival order.
LOOKAHEAD = 8192


class GpuWorker(Handler):
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        model: str,
        engine: Engine,
        *,
        serde: Serde | None = None,
        aging_s: float = 30.0,
        producer: Producer | None = None,
        watch_cancellations: bool = True,
        on_finished: Callable[[str, list[Out]], None] | None = None,
    ) -> None:
        entry = catalog.get(model)
        if entry is None:
            raise PipelineRejection(DeadLetterReason.UNKNOWN_MODEL, f"{model} not in catalog")
        self.settings = settings
        self.entry: ModelEntry = entry
        self.engine = engine
        self.topics = Topics(settings.topic_prefix)
        self.serde = serde or clients.serde(settings)
        es = settings.engine
        self.max_inflight = es.max_inflight or engine.max_inflight
        # Room for requests that outrank everything running (settings.consumer.room): "queue" lets
        # a few more than the engine runs wait at the head of its priority queue; "reserve" keeps
        # as many of its slots free for high priority.
        self.room = settings.consumer.room
        reserved = settings.consumer.reserved_slots
        self.priority_headroom = max(1, self.max_inflight // 8) if reserved is None else reserved
        if self.room == "reserve":
            self.priority_headroom = min(self.priority_headroom, self.max_inflight - 1)
        decoded = max(64, 2 * self.max_inflight)
        capacity = es.buffer_per_priority or max(LOOKAHEAD, decoded)
        self.pace = DecodePace(settings.consumer.at_risk_margin_s)
        weights = settings.tenants.weights
        self.buffer = PriorityBuffer(
            capacity_per_priority=capacity,
            aging_s=aging_s,
            max_bytes_per_priority=es.buffer_mib_per_priority << 20,
            service_s=self.pace.service_s,
            weight=lambda tenant: weights.get(tenant, 1.0),
            urgent_s=settings.consumer.at_risk_margin_s,
            deadlines=settings.consumer.deadline_order,
            fair=settings.consumer.fair_share,
            decode=lambda value: self.serde.decode(InferenceRequest, value),
            decoded_per_priority=decoded,
        )
        self._risk_checked = 0.0
        self.flow = PartitionFlow(self.buffer, self.topics)
        self.inflight = InFlight()
        self.run_id = uuid.uuid4().hex[:16]
        self.outcomes = Outcomes(
            entry,
            catalog.most_capable(),
            self.topics,
            settings.retry,
            run_id=self.run_id,
            publish_status=settings.publish_status,
        )
        self.group_id = self.topics.gpu_group(entry.name)
        # Share mode's group: its own name (a group id is either a consumer or a share group).
        self.share_group_id = f"{self.group_id}-share"
        self.share = False
        # Share mode: what the group was set to (the broker may cap the lock).
        self.lock_duration_s = settings.consumer.lock_duration_s
        self.delivery_limit = settings.consumer.delivery_limit
        self.component = f"gpu-{entry.name}"
        extra: dict[str, object] = {"linger.ms": 2}
        if settings.kafka.transactional:
            extra["transactional.id"] = f"{self.group_id}-{self.run_id}"
        kafka_producer = (
            producer
            if producer is not None
            else cast(Producer, clients.producer(settings.kafka, self.component, **extra))
        )
        self.publisher: TrackedPublisher
        if settings.kafka.transactional:
            self.publisher = TransactionalPublisher(kafka_producer, self.serde)
        else:
            self.publisher = TrackedPublisher(kafka_producer, self.serde)
        self.on_finished = on_finished
        self._loop: ConsumeLoop | ShareLoop | None = None
        self.watch_cancellations = watch_cancellations
        self.cancels: CancelWatch | None = None
        # Engine-failure isolation: groups of suspects, run alone, halved on each failure.
        self._suspects: deque[list[Buffered]] = deque()
        self._isolating = False
        self.finished = 0

    # -- Rebalances ----------------------------------------------------------------------------
    def on_assign(self, loop: ConsumeLoop, tps: list[TP]) -> None:
        self.flow.assign(tps)

    def on_revoke(self, loop: ConsumeLoop, tps: set[TP]) -> None:
        # The new owner refetches from the committed offset: hand back what is running from these
        # partitions (nothing was produced for it, so nothing is doubled) and release what is
        # buffered; the loop then commits what is acknowledged.
        aborted = self._hand_back(self.inflight.on(tps), "its partition moved to another consumer")
        dropped = self.buffer.drop(tps)
        self._suspects = deque([it for it in g if (it.topic, it.partition) not in tps] for g in self._suspects)
        self._suspects = deque(g for g in self._suspects if g)
        self.flow.revoke(tps)
        logger.info("giving up %s (aborted %d running, released %d buffered)", sorted(tps), len(aborted), dropped)

    # -- Intake ---------------------------------------------------------------------------------
    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        topic, partition, offset = message_coords(msg)
        tp = (topic, partition)
        if not self.share:
            if self.flow.draining or not self.flow.owns(tp) or self.flow.skip(tp, offset):
                return
            if self.flow.full(tp) and self.flow.rewind(loop, tp, offset):
                return
        loop.take(msg)
        value = msg.value() or b""
        kind, ts = msg.timestamp()
        timestamp_ms = ts if kind != TIMESTAMP_NOT_AVAILABLE else None
        try:
            request = self.serde.decode(InferenceRequest, value)
        except PipelineRejection as exc:
            self.publisher.publish(
                (tp, offset),
                self.outcomes.rejected(
                    Source(topic, partition, offset, value, timestamp_ms), exc, carried(msg.headers())
                ),
            )
            return
        item = Buffered(
            topic, partition, offset, value, request, time.monotonic(), timestamp_ms, carried(msg.headers())
        )
        deliveries = msg.delivery_count() if self.share else None
        if deliveries is not None and deliveries >= self.delivery_limit:
            # Delivered this many times: each earlier consumer died or stalled with it (a request
            # that kills its engine process). Dead-lettered, then rejected: it stops here.
            assert isinstance(loop, ShareLoop)
            loop.reject_when_done(tp, offset)
            error = (
                f"delivered {deliveries} times (the share group's delivery limit): a consumer died or "
                "stalled with it each time"
            )
            self._finish(
                item, self.outcomes.failed(item, DeadLetterReason.RETRIES_EXHAUSTED, error, utcnow()), "failed"
            )
            return
        self.buffer.add(item)

    # -- Outcomes -------------------------------------------------------------------------------
    def _finish(self, item: Buffered, outs: list[Out], status: str) -> None:
        self.publisher.publish(((item.topic, item.partition), item.offset), outs)
        REQUESTS.labels(self.entry.name, status).inc()
        observe_records((o.record for o in outs), source="engine")
        self.finished += 1
        if self.on_finished is not None:
            self.on_finished(item.request.request_id, outs)

    def _fail(
        self,
        item: Buffered,
        reason: DeadLetterReason,
        error: str,
        started: datetime,
        out: EngineOutput | None = None,
        running: Running | None = None,
    ) -> None:
        usage = running.usage if running is not None else None
        self._finish(item, self.outcomes.failed(item, reason, error, started, out, usage), "failed")

    def _completed(self, out: EngineOutput) -> None:
        running = self.inflight.pop(out.request_id)
        if running is None:
            return  # aborted meanwhile
        if out.error is not None:
            self._fail(
                running.item, out.error_kind or DeadLetterReason.ENGINE_ERROR, out.error, running.started, out, running
            )
            return
        outs = self.outcomes.succeeded(running.item, out, running.started, running.usage)
        self._finish(running.item, outs, "succeeded")

    def _abort(self, request_ids: list[str], reason: DeadLetterReason, why: Callable[[Running], str]) -> None:
        reasons = {rid: why(r) for rid in request_ids if (r := self.inflight.get(rid)) is not None}
        for out in self.engine.abort(list(reasons)):
            running = self.inflight.pop(out.request_id)
            if running is not None:
                self._fail(running.item, reason, reasons[out.request_id], running.started, out, running)

    # -- Admission ------------------------------------------------------------------------------
    def _cancelled(self, request_id: str) -> str | None:
        return self.cancels.reason(request_id) if self.cancels is not None else None

    def _start(self, item: Buffered, now: datetime) -> None:
        req = item.request
        cancelled = self._cancelled(req.request_id)
        if cancelled is not None:
            self._fail(item, DeadLetterReason.CANCELLED, cancelled, now)
            return
        if req.deadline is not None and req.deadline <= now:
            self._fail(
                item,
                DeadLetterReason.DEADLINE_EXPIRED,
                f"deadline {req.deadline.isoformat()} passed before it started",
                now,
            )
            return
        rank = self.buffer.effective_rank(item, now)
        refused = self.engine.add(
            EngineRequest(
                request_id=req.request_id,
                messages=[m.model_dump() for m in req.messages],
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                priority=rank,
                attempt=req.attempt,
                stop=tuple(req.stop),
                response_format=req.response_format,
            )
        )
        if refused is not None:
            self._fail(
                item, refused.error_kind or DeadLetterReason.ENGINE_ERROR, refused.error or "refused", now, refused
            )
            return
        self.inflight.add(item, now, rank)
        self.publisher.advisory(self.outcomes.status(req.request_id, RequestState.RUNNING, f"engine run {self.run_id}"))

    def _hand_back(self, request_ids: list[str], why: str) -> list[str]:
        self.engine.abort(request_ids)
        handed = []
        for rid in request_ids:
            running = self.inflight.pop(rid)
            if running is not None:
                self._give_back(running.item, why)
                handed.append(rid)
        return handed

    def _give_back(self, item: Buffered, why: str) -> None:
        """A request this consumer took but will not finish goes to another consumer: in a share
        group released as it is (nothing re-produced); in a consumer group put back at the end
        of its partition (see ``Outcomes.handback``)."""
        if self.share:
            assert isinstance(self._loop, ShareLoop)
            self._loop.release((item.topic, item.partition), item.offset)
            self.publisher.advisory(
                self.outcomes.status(item.request.request_id, RequestState.QUEUED, f"released: {why}")
            )
            return
        self.publisher.publish(((item.topic, item.partition), item.offset), self.outcomes.handback(item, why))

    def _admit(self) -> None:
        now = utcnow()
        if self._isolating or self._suspects:
            # Isolating an engine failure: one group at a time, nothing else beside it.
            if len(self.inflight):
                return
            self._isolating = bool(self._suspects)
            if self._suspects:
                for item in self._suspects.popleft():
                    self._start(item, now)
            return
        top = Priority.HIGH.rank
        lower = self.max_inflight - self.priority_headroom if self.room == "reserve" else self.max_inflight
        while len(self.buffer) and len(self.inflight) < self.max_inflight:
            best = self.buffer.best_rank(now)
            if len(self.inflight) >= lower and (best is None or best > top):
                break  # the rest is kept for high priority
            for item in self.buffer.take(1, now):
                self._start(item, now)
        if self.room == "preempt":
            self._preempt(now)
            return
        if self.room != "queue":
            return
        # Queue: a request that outranks everything running waits at the head of the engine's
        # priority queue, so it starts at the next free slot.
        while len(self.buffer) and len(self.inflight) < self.max_inflight + self.priority_headroom:
            best, worst = self.buffer.best_rank(now), self.inflight.worst_rank()
            if best is None or worst is None or best >= worst:
                return
            for item in self.buffer.take(1, now):
                self._start(item, now)

    def _preempt(self, now: datetime) -> None:
        """The engine is full and a buffered request outranks something running: abort the
        lowest-priority, least advanced running request, put it back at the head of its priority
        (it starts over; the engine time it used stays on its bill) and start the higher one."""
        while len(self.buffer) and len(self.inflight) >= self.max_inflight:
            best = self.buffer.best_tier(now)
            victim = self.inflight.victim(best) if best is not None else None
            if victim is None:
                return
            rid = victim.item.request.request_id
            self.engine.abort([rid])
            self.inflight.pop(rid)
            victim.item.spent_ms += victim.engine_ms
            victim.item.preempted += 1
            self.buffer.requeue(victim.item)
            PREEMPTED.labels(self.entry.name).inc()
            self.publisher.advisory(
                self.outcomes.status(
                    rid, RequestState.QUEUED, f"preempted after {victim.steps} step(s) for a higher priority"
                )
            )
            for item in self.buffer.take(1, now):
                self._start(item, now)

    def _engine_died(self, exc: EngineDied) -> None:
        suspects = [r.item for r in self.inflight.pop_all()]
        logger.error("engine died with %d request(s) in it (%s); restarting", len(suspects), exc)
        self.engine.restart()
        self._isolating = False
        now = utcnow()
        if len(suspects) == 1:
            (item,) = suspects
            outs = self.outcomes.retry_or_fail(item, str(exc), now)
            retried = any(isinstance(o.record, InferenceRequest) for o in outs)
            self._finish(item, outs, "retried" if retried else "failed")
            return
        mid = len(suspects) // 2
        self._suspects.appendleft(suspects[mid:])
        self._suspects.appendleft(suspects[:mid])

    def _step(self) -> None:
        t0 = time.monotonic()
        running = len(self.inflight)
        try:
            finished = self.engine.step()
        except EngineDied as exc:
            self.inflight.charge(time.monotonic() - t0)
            self._engine_died(exc)
            return
        seconds = time.monotonic() - t0
        self.inflight.charge(seconds)
        self.pace.observe(seconds, running)
        ENGINE_SECONDS.labels(self.entry.name).observe(seconds)
        for out in finished:
            self._completed(out)

    def _risks(self) -> None:
        """Say, once, which requests (buffered or running) may miss their deadline."""
        now_s = time.monotonic()
        if now_s - self._risk_checked < 0.5 or self.pace.step_s is None:
            return
        self._risk_checked = now_s
        now = utcnow()
        # Read from the facts a buffered request keeps: only one at risk is decoded.
        candidates = [(i, 0) for i in self.buffer.items() if i.deadline is not None]
        for rid in self.inflight.ids():
            running = self.inflight.get(rid)
            if running is not None and running.item.deadline is not None:
                candidates.append((running.item, running.steps))
        for item, generated in candidates:
            if item.flagged:
                continue  # the router said it already (and acted on its policy)
            slack = self.pace.at_risk(item, now, generated)
            if slack is None:
                continue
            req = item.request
            assert req.deadline is not None
            AT_RISK.labels(self.entry.name, req.priority).inc()
            left = (req.deadline - now).total_seconds()
            need = self.pace.service_s(req, generated)
            detail = (
                f"deadline in {left:.0f}s; about {need:.0f}s of generation left "
                f"({req.max_tokens - generated} tokens at {self.pace.tokens_per_second or 0:.1f} tokens/s)"
            )
            self.publisher.advisory(
                at_risk_records(
                    self.topics, req, model=self.entry.name, detail=detail, publish_status=self.settings.publish_status
                )
            )

    def _watch(self) -> None:
        """Abort running requests that were cancelled or ran out of time; say which are at risk."""
        self._risks()
        if not len(self.inflight):
            return
        if self.cancels is not None:
            self.cancels.poll()
            cancelled = [rid for rid in self.inflight.ids() if self._cancelled(rid) is not None]
            if cancelled:
                self._abort(
                    cancelled,
                    DeadLetterReason.CANCELLED,
                    lambda r: self._cancelled(r.item.request.request_id) or "cancelled",
                )
        expired = self.inflight.expired(utcnow())
        if expired:
            self._abort(
                expired,
                DeadLetterReason.DEADLINE_EXPIRED,
                lambda r: f"deadline {r.item.request.deadline} passed while it ran; aborted",
            )

    # -- Loop -----------------------------------------------------------------------------------
    def consumer(self) -> Any:
        # A small prefetch queue keeps memory flat however deep the backlog is (the buffer is the
        # real queue). The fetch sizes count compressed bytes: a backlog written in large zstd
        # batches of similar prompts inflates twenty-fold or more when a fetch is decompressed,
        # so 128 KB per partition held some 40 MB at once (bench P6: 103 MiB at a 100k backlog
        # against 64 MiB at 1k); 16 KB keeps it near the shallow figure. A larger batch is still
        # fetched whole (Kafka returns at least one), so nothing gets stuck.
        return clients.consumer(
            self.settings.kafka,
            self.component,
            self.group_id,
            **{
                "queued.max.messages.kbytes": 512,
                "fetch.max.bytes": 1 << 20,
                "max.partition.fetch.bytes": 16 << 10,
                # librdkafka postpones a partition's next fetch by this much (default 1 s) once the
                # prefetch queue is over its bound; with the bound this small that would stall newly
                # arriving high-priority requests behind rewound backlog.
                "fetch.queue.backoff.ms": 10,
            },
        )

    def loop(self, consumer: Any | None = None, *, share: Callable[[], Any] | None = None) -> ConsumeLoop:
        """The loop over this model's topics: a consumer group's committing loop (messages taken
        only once buffered; a full priority rewinds instead), or, with ``share`` (a factory of
        share consumers), a share group's, per-request acknowledged. Tests pass the stub
        broker's consumer or share-consumer factory."""
        if share is not None:
            self.share = True
            lanes = [
                (p.value, [self.topics.model(self.entry.name, p)], share)
                for p in PRIORITIES
                for _ in range(self.settings.consumer.lanes_per_priority)
            ]
            self._loop = ShareLoop(self, lanes, publisher=self.publisher, idle_wait_s=0.05)
            return cast(ConsumeLoop, self._loop)
        self.share = False
        self._loop = ConsumeLoop(
            self,
            consumer if consumer is not None else self.consumer(),
            self.topics.model_topics(self.entry.name),
            publisher=self.publisher,
            track=False,
            idle_wait_s=0.05,
        )
        return self._loop

    def share_consumer(self) -> Any:
        lock_ms = int(self.lock_duration_s * 1000)
        # A lane holding a long request cannot poll; it must not count as a dead member before
        # its records' locks run out.
        return clients.share_consumer(
            self.settings.kafka,
            self.component,
            self.share_group_id,
            **{
                "max.poll.records": max(1, self.max_inflight // 4),
                "max.poll.interval.ms": lock_ms + 60_000,
                "fetch.max.bytes": 16 << 10,
                "max.partition.fetch.bytes": 16 << 10,
            },
        )

    def consumption_mode(self) -> str:
        """ "share" or "classic", from ``SLUICE_CONSUMER__GROUP`` and what the broker offers; a
        share group is configured here (start, lock duration, delivery limit)."""
        wanted = self.settings.consumer.group
        if wanted == "classic":
            return "classic"
        if self.settings.kafka.transactional:
            if wanted == "share":
                raise ConfigError(
                    "share groups have no transactions: the exactly-once option needs SLUICE_CONSUMER__GROUP=classic"
                )
            logger.info("consumer group mode: classic (the transactional option needs a consumer group)")
            return "classic"
        c = self.settings.consumer
        setup = prepare_share_group(
            clients.admin(self.settings.kafka, self.component),
            self.share_group_id,
            lock_duration_ms=int(c.lock_duration_s * 1000),
            delivery_limit=c.delivery_limit,
        )
        if not isinstance(setup, str):
            self.lock_duration_s = setup.lock_duration_ms / 1000
            self.delivery_limit = setup.delivery_limit
            logger.info(
                "consumer group mode: share group %s (record lock %gs, delivery limit %d)",
                setup.group,
                self.lock_duration_s,
                self.delivery_limit,
            )
            return "share"
        why = setup
        if wanted == "share":
            raise ConfigError(f"SLUICE_CONSUMER__GROUP=share, but the broker has no share groups: {why}")
        logger.info("consumer group mode: classic (the broker has no share groups: %s)", why)
        return "classic"

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        if self.watch_cancellations:
            self.cancels = CancelWatch(self.settings, self.serde)
        share = self.consumption_mode() == "share"
        loop = self.loop(share=self.share_consumer if share else None)
        logger.info(
            "gpu worker for %s consuming as %s (max in flight %d)",
            self.entry.name,
            self.share_group_id if share else self.group_id,
            self.max_inflight,
        )
        try:
            loop.run(stop, ready)
        finally:
            if self.cancels is not None:
                self.cancels.close()
            logger.info(
                "gpu worker for %s stopped: %d finished, %.1fs engine time",
                self.entry.name,
                self.finished,
                self.inflight.engine_seconds,
            )

    @property
    def acquired(self) -> int | None:
        """Share mode: requests acquired and not yet acknowledged (what a crash here hands back
        to the group); None in classic mode."""
        return self._loop.held if isinstance(self._loop, ShareLoop) else None

    @property
    def acknowledged(self) -> dict[str, int]:
        """Share mode: acknowledgements sent, by kind (accept, release, reject)."""
        return dict(self._loop.acknowledged) if isinstance(self._loop, ShareLoop) else {}

    @property
    def idle(self) -> bool:
        """Nothing buffered, running or being isolated."""
        return not (len(self.buffer) or len(self.inflight) or self._suspects)

    def wants(self, key: str) -> int:
        """Share mode: acquire only what the engine can start soon (its free slots plus a small
        prefetch), high before normal before low; a request that would outrank everything running
        may also take one of the headroom slots."""
        if self.flow.draining:
            return 0
        prefetch = max(2, self.max_inflight // 4)
        room = self.max_inflight + prefetch - len(self.inflight) - len(self.buffer)
        if key == Priority.HIGH.value:
            room = max(room, self.priority_headroom - self.buffer.depth(Priority.HIGH.rank))
        return room

    def _release_stale(self) -> None:
        """Share mode: a buffered request that cannot start before its lock runs out goes back
        (another consumer may start it sooner; run here after expiry it could run twice)."""
        limit = time.monotonic() - self.lock_duration_s * 0.8
        for item in self.buffer.pop_where(lambda i: i.arrived >= limit):
            self._give_back(item, "its lock was about to run out before it could start")

    def on_cycle(self, loop: ConsumeLoop) -> bool:
        if self.share:
            self._release_stale()
        else:
            self.flow.apply(loop)
        if self.cancels is not None and len(self.buffer):
            self.cancels.poll()
        self._watch()
        if not self.flow.draining:
            self._admit()
        if len(self.inflight):
            self._step()
        ENGINE_INFLIGHT.labels(self.entry.name).set(len(self.inflight))
        return bool(len(self.inflight))

    def on_stop(self, loop: ConsumeLoop) -> None:
        """Graceful stop: admit nothing more, let running requests finish within ``drain_s``, hand
        the rest back to their partitions (the next owner runs them); the loop then commits what is
        acknowledged. Buffered requests that never started stay uncommitted for the next owner."""
        self.flow.stop_fetching(loop)
        if self.share:
            # Not started here: back to the group at once, the other consumers take them now.
            for item in self.buffer.pop_where(lambda i: False):
                self._give_back(item, "the consumer stopped before it started")
        grace = self.settings.engine.drain_s
        deadline = time.monotonic() + grace
        while len(self.inflight) and time.monotonic() < deadline:
            self.on_cycle(loop)
            self.publisher.poll()
        left = self._hand_back(self.inflight.ids(), f"the consumer stopped; not finished within {grace:g}s")
        if left:
            logger.warning("drain: %d request(s) still running after %.0fs handed back", len(left), grace)
