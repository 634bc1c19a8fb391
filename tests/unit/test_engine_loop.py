"""The GPU consumer's engine loop, driven without a broker: a fake Kafka consumer feeds it, an
in-memory producer acknowledges what it publishes, and the instant test engine (a named test
double) stands in for vLLM with one token per running request per step."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from core.catalog import Catalog
from core.settings import Settings
from core.topics import Topics
from gpu_consumers.engine import EngineOutput, EngineRequest
from gpu_consumers.instant_engine import POISON_PILL, InstantTestEngine
from gpu_consumers.worker import GpuWorker
from schemas import (
    ChatMessage,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestStatus,
    Route,
    Serde,
    utcnow,
)
from tests.support import model_entry

SERDE = Serde()
PREFIX = "u."
TOPICS = Topics(PREFIX)


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None = None) -> None:
        self._coords = (topic, partition, offset)
        self._value = value

    def topic(self) -> str:
        return self._coords[0]

    def partition(self) -> int:
        return self._coords[1]

    def offset(self) -> int:
        return self._coords[2]

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._coords[2])

    def headers(self) -> list[tuple[str, bytes]] | None:
        return [("traceparent", f"00-{'a' * 32}-{self._coords[2] + 1:016x}-01".encode())]


class FakeConsumer:
    """Hands out queued messages of unpaused partitions; records commits."""

    def __init__(self) -> None:
        self.queue: deque[FakeMessage] = deque()
        self.paused: set[tuple[str, int]] = set()
        self.committed: dict[tuple[str, int], int] = {}

    def consume(self, num_messages: int = 1, timeout: float = 0) -> list[FakeMessage]:
        out = []
        for msg in list(self.queue):
            if len(out) >= num_messages:
                break
            if (msg.topic(), msg.partition()) not in self.paused:
                self.queue.remove(msg)
                out.append(msg)
        return out

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, tp: TopicPartition) -> None:
        pass

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset


class MemoryProducer:
    """Acknowledges every record on the next poll or flush, as a healthy broker would."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str | None, Any]] = []
        self._pending: list[tuple[Any, FakeMessage]] = []

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Any = None,
        partition: int = -1,
        on_delivery: Any = None,
    ) -> None:
        record = SERDE.decode(_TYPES[topic], value)
        self.records.append((topic, key.decode() if key else None, record))
        if on_delivery is not None:
            self._pending.append((on_delivery, FakeMessage(topic, 0, len(self.records))))

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for callback, msg in pending:
            callback(None, msg)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def of(self, kind: type) -> list[Any]:
        return [r for _, _, r in self.records if isinstance(r, kind)]


_TYPES: dict[str, type] = {
    TOPICS.results: InferenceResult,
    TOPICS.cost_metrics: CostMetric,
    TOPICS.dead_letter: DeadLetter,
    TOPICS.status: RequestStatus,
    **{TOPICS.retry(i): InferenceRequest for i in range(3)},
    **{TOPICS.model("m", p): InferenceRequest for p in Priority},
}


class FakeCancels:
    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def poll(self) -> int:
        return 0

    def reason(self, request_id: str) -> str | None:
        return self.ids.get(request_id)

    def close(self) -> None:
        pass


class RecordingEngine(InstantTestEngine):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.added: list[EngineRequest] = []

    def add(self, request: EngineRequest) -> EngineOutput | None:
        self.added.append(request)
        return super().add(request)


def _worker(max_inflight: int = 4, **engine_kw: Any) -> tuple[GpuWorker, RecordingEngine, FakeConsumer, MemoryProducer]:
    settings = Settings(topic_prefix=PREFIX, publish_status=True)
    settings.engine.kind = "instant"
    settings.retry.backoff_ms = [100, 200]
    catalog = Catalog(models=[model_entry("m", context_length=100_000)])
    engine = RecordingEngine("m", max_model_len=100_000, max_inflight=max_inflight, **engine_kw)
    producer = MemoryProducer()
    worker = GpuWorker(settings, catalog, "m", engine, serde=SERDE, producer=producer, watch_cancellations=False)
    worker.cancels = FakeCancels()  # type: ignore[assignment]
    consumer = FakeConsumer()
    tps = [(TOPICS.model("m", p), 0) for p in Priority]
    worker._on_assign(consumer, [TopicPartition(t, p) for t, p in tps])  # type: ignore[arg-type]
    return worker, engine, consumer, producer


def _request(rid: str, max_tokens: int, priority: Priority = Priority.LOW, **kw: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=rid,
        priority=priority,
        messages=[ChatMessage(role="user", content=f"prompt {rid}")],
        max_tokens=max_tokens,
        route=Route(model="m", reason="test"),
        **kw,
    )


def _feed(consumer: FakeConsumer, requests: Iterable[InferenceRequest]) -> None:
    offsets: dict[str, int] = {}
    for msg in consumer.queue:
        offsets[msg.topic()] = max(offsets.get(msg.topic(), 0), msg.offset() + 1)
    for r in requests:
        topic = TOPICS.model("m", r.priority)
        consumer.queue.append(FakeMessage(topic, 0, offsets.get(topic, 0), SERDE.encode(r)))
        offsets[topic] = offsets.get(topic, 0) + 1


def _run(worker: GpuWorker, consumer: FakeConsumer, cycles: int = 1000) -> int:
    """Cycle until nothing is left to do; returns the cycles taken."""
    for n in range(cycles):
        if not (consumer.queue or len(worker.buffer) or len(worker.inflight) or worker._suspects):
            worker.publisher.flush()
            worker._commit(consumer, asynchronous=False)  # type: ignore[arg-type]
            return n
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    raise AssertionError("the loop did not settle")


def _finished_order(producer: MemoryProducer) -> list[str]:
    return [r.request_id for r in producer.of(InferenceResult)]


def test_requests_are_admitted_as_others_finish_and_published_as_each_finishes() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=4)
    lengths = [8, 1, 1, 1, 8, 1, 1, 1, 2, 2]
    _feed(consumer, [_request(f"r{i}", n) for i, n in enumerate(lengths)])
    _run(worker, consumer)
    results = producer.of(InferenceResult)
    assert len(results) == len(lengths) and all(r.status == "succeeded" for r in results)
    # Short requests come out before the long ones that entered the engine with them.
    order = _finished_order(producer)
    assert order.index("r1") < order.index("r0") and order.index("r5") < order.index("r0")
    # Batch-at-a-time (4 at once, each batch waiting for its slowest) needs 8 + 8 + 2 = 18 steps;
    # refilling slots as they free up needs about the total work divided by the slots.
    assert engine.steps <= 12, engine.steps
    assert engine.peak_running == 4
    assert consumer.committed[(TOPICS.model("m", Priority.LOW), 0)] == len(lengths)


def test_offsets_move_only_up_to_the_lowest_unfinished_request() -> None:
    worker, _engine, consumer, producer = _worker(max_inflight=4)
    _feed(consumer, [_request("long", 50), *[_request(f"s{i}", 1) for i in range(3)]])
    for _ in range(5):
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    worker.publisher.flush()
    worker._commit(consumer, asynchronous=False)  # type: ignore[arg-type]
    assert set(_finished_order(producer)) == {"s0", "s1", "s2"}
    assert consumer.committed.get((TOPICS.model("m", Priority.LOW), 0), 0) == 0  # "long" at offset 0 runs on
    _run(worker, consumer)
    assert consumer.committed[(TOPICS.model("m", Priority.LOW), 0)] == 4


def test_high_priority_reaches_the_engine_ahead_of_a_full_low_backlog() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=4)
    _feed(consumer, [_request(f"low{i}", 20) for i in range(12)])
    for _ in range(3):
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    assert len(worker.inflight) == 4 and len(worker.buffer) == 8
    _feed(consumer, [_request("high", 2, Priority.HIGH)])
    worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    # It takes a headroom slot at once, with its priority, instead of waiting behind 8 low ones.
    assert "high" in worker.inflight and len(worker.inflight) == 5
    added = {r.request_id: r.priority for r in engine.added}
    assert added["high"] == Priority.HIGH.rank < added["low0"] == Priority.LOW.rank
    _run(worker, consumer)
    order = _finished_order(producer)
    assert order.index("high") < order.index("low4")


def test_aging_raises_the_priority_the_engine_sees() -> None:
    worker, engine, consumer, _producer = _worker(max_inflight=4)
    old = _request("old-low", 1, created_at=utcnow() - timedelta(seconds=65))
    _feed(consumer, [old])
    _run(worker, consumer)
    assert engine.added[0].priority == Priority.LOW.rank - 2  # two aging periods (30 s each)


def test_cancelled_and_expired_running_requests_are_aborted_and_billed() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=4)
    soon = utcnow() + timedelta(milliseconds=300)
    _feed(consumer, [_request("cancel-me", 10_000), _request("late", 10_000, deadline=soon), _request("ok", 3)])
    for _ in range(4):
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    assert "cancel-me" in worker.inflight
    worker.cancels.ids["cancel-me"] = "no longer needed"  # type: ignore[union-attr]
    import time

    deadline = time.monotonic() + 5
    while len(worker.inflight) and time.monotonic() < deadline:
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
        time.sleep(0.01)
    worker.publisher.flush()
    results = {r.request_id: r for r in producer.of(InferenceResult)}
    assert results["ok"].status == "succeeded"
    assert results["cancel-me"].error == "cancelled: no longer needed"
    assert results["late"].error is not None and results["late"].error.startswith("deadline_expired: ")
    metrics = {m.request_id: m for m in producer.of(CostMetric)}
    for rid in ("cancel-me", "late"):
        assert 0 < metrics[rid].output_tokens < 10_000 and metrics[rid].cost_usd > 0
    reasons = {d.request_id: d.reason.value for d in producer.of(DeadLetter)}
    assert reasons == {"cancel-me": "cancelled", "late": "deadline_expired"}
    assert not engine.has_unfinished()


def test_per_request_engine_time_adds_up_to_the_engine_time() -> None:
    worker, _engine, consumer, producer = _worker(max_inflight=3, token_seconds=0.002)
    _feed(consumer, [_request(f"r{i}", n) for i, n in enumerate([5, 1, 9, 3, 3, 7, 2])])
    _run(worker, consumer)
    metrics = producer.of(CostMetric)
    assert len(metrics) == 7
    total_ms = sum(m.engine_ms for m in metrics)
    assert total_ms == pytest.approx(worker.inflight.engine_seconds * 1000, rel=1e-6)
    # A request that ran longer, beside others, was charged more.
    by_id = {m.request_id: m for m in metrics}
    assert by_id["r2"].engine_ms > by_id["r1"].engine_ms
    assert all(1 <= m.batch_size <= 3 for m in metrics)


def test_a_request_that_kills_the_engine_is_isolated_and_the_others_finish() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=8)
    reqs = [_request(f"r{i}", 3) for i in range(8)]
    reqs[5] = InferenceRequest(
        request_id="poison",
        priority=Priority.LOW,
        messages=[ChatMessage(role="user", content=f"a {POISON_PILL}")],
        max_tokens=3,
        route=Route(model="m", reason="test"),
    )
    _feed(consumer, reqs)
    _run(worker, consumer)
    results = {r.request_id: r for r in producer.of(InferenceResult)}
    assert sorted(results) == sorted(r.request_id for r in reqs if r.request_id != "poison")
    assert all(r.status == "succeeded" and r.attempt == 0 for r in results.values())
    (retry,) = producer.of(InferenceRequest)
    assert retry.request_id == "poison" and retry.attempt == 1
    # Halving 8 suspects: the culprit is alone after log2(8) = 3 deaths.
    assert engine.restarts <= 4
    assert consumer.committed[(TOPICS.model("m", Priority.LOW), 0)] == 8


def test_draining_finishes_what_it_can_and_hands_the_rest_back() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=4, token_seconds=0.001)
    worker.settings.engine.drain_s = 0.2
    _feed(consumer, [_request("short", 2), _request("endless", 30_000), _request("queued", 1)])
    worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    worker._drain(consumer)  # type: ignore[arg-type]
    assert sorted(_finished_order(producer)) == ["queued", "short"]
    assert not engine.has_unfinished()
    # "endless" (offset 1) is put back at the end of its partition, without a result: the next
    # owner runs it, and "queued" (offset 2), finished behind it, is committed and not run twice.
    low = TOPICS.model("m", Priority.LOW)
    assert [(t, r.request_id) for t, _, r in producer.records if isinstance(r, InferenceRequest)] == [(low, "endless")]
    assert consumer.committed[(low, 0)] == 3


def test_a_revoked_partition_hands_its_running_requests_back_without_results() -> None:
    worker, engine, consumer, producer = _worker(max_inflight=4)
    _feed(consumer, [_request("a", 30_000), _request("b", 30_000)])
    for _ in range(2):
        worker._cycle(consumer, idle_wait=0)  # type: ignore[arg-type]
    assert len(worker.inflight) == 2
    low = TOPICS.model("m", Priority.LOW)
    worker._on_revoke(consumer, [TopicPartition(low, 0)])  # type: ignore[arg-type]
    assert len(worker.inflight) == 0 and not engine.has_unfinished()
    assert producer.of(InferenceResult) == []
    assert sorted(r.request_id for r in producer.of(InferenceRequest)) == ["a", "b"]
    assert consumer.committed[(low, 0)] == 2
