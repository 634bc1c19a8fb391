"""The GPU consumer's engine loop, driven without a broker: the runtime's stub broker
(``core.kafka.stub``) feeds it and acknowledges what it publishes, and the instant test engine (a
named test double) stands in for vLLM with one token per running request per step. Only public
interfaces: the worker's committing loop (``worker.loop``), its cycles and its graceful stop."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from core.catalog import Catalog
from core.kafka import ConsumeLoop
from core.kafka.stub import StubBroker
from core.settings import Settings
from core.topics import Topics
from gpu_consumers.buffer import QUANTUM, Buffered, token_cost
from gpu_consumers.cancellations import CancelWatch
from gpu_consumers.engine import EngineOutput, EngineRequest
from gpu_consumers.inflight import InFlight
from gpu_consumers.instant_engine import POISON_PILL, InstantTestEngine
from gpu_consumers.worker import GpuWorker
from schemas import (
    ChatMessage,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestState,
    RequestStatus,
    Route,
    Serde,
    utcnow,
)
from tests.support import model_entry

SERDE = Serde()
PREFIX = "u."
TOPICS = Topics(PREFIX)
GROUP = f"{PREFIX}gpu-m"
LOW = (TOPICS.model("m", Priority.LOW), 0)

_TYPES: dict[str, type] = {
    TOPICS.results: InferenceResult,
    TOPICS.cost_metrics: CostMetric,
    TOPICS.dead_letter: DeadLetter,
    TOPICS.status: RequestStatus,
    **{TOPICS.retry(i): InferenceRequest for i in range(3)},
    **{TOPICS.model("m", p): InferenceRequest for p in Priority},
}


class RecordingEngine(InstantTestEngine):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.added: list[EngineRequest] = []

    def add(self, request: EngineRequest) -> EngineOutput | None:
        self.added.append(request)
        return super().add(request)


@dataclass
class Rig:
    broker: StubBroker
    worker: GpuWorker
    engine: RecordingEngine
    loop: ConsumeLoop

    def of(self, kind: type) -> list[Any]:
        """Records of ``kind`` produced so far, in order (model-topic copies excluded unless asked)."""
        out = []
        for topic, record_type in _TYPES.items():
            if record_type is kind and (kind is not InferenceRequest or topic not in self.fed):
                out += [SERDE.decode(kind, m.value()) for m in self.broker.messages(topic)]
        return out

    @property
    def fed(self) -> set[str]:
        return set(TOPICS.model_topics("m"))

    def committed(self, tp: tuple[str, int] = LOW) -> int:
        return self.broker.committed.get(GROUP, {}).get(tp, 0)

    def cycles(self, n: int) -> None:
        for _ in range(n):
            self.loop.run_once(wait=0)

    def settle(self, cycles: int = 1000) -> int:
        """Cycle until nothing is left to do, then flush and commit; returns the cycles taken."""
        for n in range(cycles):
            taken = self.loop.run_once(wait=0)
            if not taken and self.worker.idle:
                self.loop.publisher.flush()  # type: ignore[union-attr]
                self.loop.commit(asynchronous=False)
                return n
        raise AssertionError("the loop did not settle")


def _rig(
    max_inflight: int = 4,
    *,
    cancels: bool = False,
    consumer: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    **engine_kw: Any,
) -> Rig:
    settings = Settings(
        topic_prefix=PREFIX,
        publish_status=True,
        engine={"kind": "instant", **(engine or {})},
        retry={"backoff_ms": [100, 200]},
        consumer=consumer or {},
    )
    catalog = Catalog(models=[model_entry("m", context_length=100_000)])
    broker = StubBroker()
    for topic in [*_TYPES, TOPICS.cancellations]:
        broker.create_topic(topic)
    recording = RecordingEngine("m", max_model_len=100_000, max_inflight=max_inflight, **engine_kw)
    worker = GpuWorker(
        settings, catalog, "m", recording, serde=SERDE, producer=broker.producer(), watch_cancellations=False
    )
    if cancels:
        worker.cancels = CancelWatch(settings, SERDE, consumer=broker.consumer("cancel-watch"))
    loop = worker.loop(broker.consumer(GROUP))
    loop.run_once(wait=0)  # joins: every partition assigned
    return Rig(broker, worker, recording, loop)


def _request(rid: str, max_tokens: int, priority: Priority = Priority.LOW, **kw: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=rid,
        priority=priority,
        messages=[ChatMessage(role="user", content=f"prompt {rid}")],
        max_tokens=max_tokens,
        route=Route(model="m", reason="test"),
        **kw,
    )


def _feed(rig: Rig, requests: Iterable[InferenceRequest]) -> None:
    for r in requests:
        rig.broker.append(TOPICS.model("m", r.priority), SERDE.encode(r), r.request_id.encode())


def _finished_order(rig: Rig) -> list[str]:
    return [r.request_id for r in rig.of(InferenceResult)]


def test_requests_are_admitted_as_others_finish_and_published_as_each_finishes() -> None:
    rig = _rig(max_inflight=4)
    lengths = [8, 1, 1, 1, 8, 1, 1, 1, 2, 2]
    _feed(rig, [_request(f"r{i}", n) for i, n in enumerate(lengths)])
    rig.settle()
    results = rig.of(InferenceResult)
    assert len(results) == len(lengths) and all(r.status == "succeeded" for r in results)
    # Short requests come out before the long ones that entered the engine with them.
    order = _finished_order(rig)
    assert order.index("r1") < order.index("r0") and order.index("r5") < order.index("r0")
    # Batch-at-a-time (4 at once, each batch waiting for its slowest) needs 8 + 8 + 2 = 18 steps;
    # refilling slots as they free up needs about the total work divided by the slots.
    assert rig.engine.steps <= 12, rig.engine.steps
    assert rig.engine.peak_running == 4
    assert rig.committed() == len(lengths)


def test_offsets_move_only_up_to_the_lowest_unfinished_request() -> None:
    rig = _rig(max_inflight=4)
    _feed(rig, [_request("long", 50), *[_request(f"s{i}", 1) for i in range(3)]])
    rig.cycles(5)
    rig.loop.publisher.flush()  # type: ignore[union-attr]
    rig.loop.commit(asynchronous=False)
    assert set(_finished_order(rig)) == {"s0", "s1", "s2"}
    assert rig.committed() == 0  # "long" at offset 0 runs on
    rig.settle()
    assert rig.committed() == 4


def test_high_priority_reaches_the_engine_ahead_of_a_full_low_backlog() -> None:
    rig = _rig(max_inflight=4, consumer={"room": "queue"})
    _feed(rig, [_request(f"low{i}", 20) for i in range(12)])
    rig.cycles(3)
    assert len(rig.worker.inflight) == 4 and len(rig.worker.buffer) == 8
    _feed(rig, [_request("high", 2, Priority.HIGH)])
    rig.cycles(1)
    # It takes a headroom slot at once, with its priority, instead of waiting behind 8 low ones.
    assert "high" in rig.worker.inflight and len(rig.worker.inflight) == 5
    added = {r.request_id: r.priority for r in rig.engine.added}
    assert added["high"] == Priority.HIGH.rank < added["low0"] == Priority.LOW.rank
    # ...but the engine is full, and it does not preempt: it waits for a low one to finish.
    rig.cycles(10)
    assert "high" not in _finished_order(rig)


def _steps_to_finish(rig: Rig, request_id: str, limit: int = 500) -> int:
    for n in range(limit):
        if request_id in _finished_order(rig):
            return n
        rig.loop.run_once(wait=0)
        rig.loop.publisher.flush()  # type: ignore[union-attr]
    raise AssertionError(f"{request_id} did not finish")


def test_preempt_aborts_the_least_advanced_lowest_request_for_a_high_one() -> None:
    rig = _rig(max_inflight=4)  # room: preempt (the default)
    lengths = {f"low{i}": 40 + i for i in range(4)} | {f"low{i}": 40 for i in range(4, 8)}
    _feed(rig, [_request(rid, n) for rid, n in lengths.items()])
    rig.cycles(3)
    # low0-3 run, a few steps in; a normal one arrives and takes a low one's slot.
    _feed(rig, [_request("normal", 30, Priority.NORMAL)])
    rig.cycles(1)
    buffered = {i.request.request_id for i in rig.worker.buffer.items()}
    (first_victim,) = buffered & {"low0", "low1", "low2", "low3"}
    assert "normal" in rig.worker.inflight and len(rig.worker.inflight) == 4
    _feed(rig, [_request("high", 2, Priority.HIGH)])
    # The high one starts at once and finishes in its own 2 tokens, not after 40.
    assert _steps_to_finish(rig, "high") <= 4
    preempted = [s for s in rig.of(RequestStatus) if "preempted" in (s.detail or "")]
    victims = [s.request_id for s in preempted]
    assert all(s.state is RequestState.QUEUED for s in preempted)
    # "high" took another low one's slot: never one of the same or a higher priority than low.
    assert len(victims) == 2 and victims[0] == first_victim and set(victims) <= set(lengths)
    rig.settle()
    results = {r.request_id: r for r in rig.of(InferenceResult)}
    assert len(results) == 10 and all(r.status == "succeeded" for r in results.values())
    # A preempted request starts over, once, and finishes whole.
    for rid in victims:
        assert results[rid].completion_tokens == lengths[rid]
        assert sum(1 for r in rig.engine.added if r.request_id == rid) == 2
    assert rig.committed() == len(lengths)


def test_a_request_that_only_aged_preempts_nothing() -> None:
    rig = _rig(max_inflight=2)
    _feed(rig, [_request(f"fresh{i}", 30) for i in range(2)])
    rig.cycles(2)
    assert len(rig.worker.inflight) == 2
    # 65 s old: aged to normal's rank, but a low request among running low ones.
    _feed(rig, [_request("old-low", 2, created_at=utcnow() - timedelta(seconds=65))])
    rig.cycles(3)
    assert "old-low" not in rig.worker.inflight
    assert not [s for s in rig.of(RequestStatus) if "preempted" in (s.detail or "")]


def test_a_preempted_runs_engine_time_stays_on_its_bill() -> None:
    item = Buffered("t", 0, 0, b"", _request("r", 4), 0.0, spent_ms=12.5)
    inflight = InFlight()
    inflight.add(item, utcnow(), Priority.LOW.rank)
    inflight.charge(0.01)
    running = inflight.get("r")
    assert running is not None and running.usage.engine_ms == pytest.approx(22.5)


def test_reserve_keeps_slots_free_for_high_priority() -> None:
    rig = _rig(max_inflight=8, consumer={"room": "reserve", "reserved_slots": 2})
    _feed(rig, [_request(f"low{i}", 30) for i in range(20)])
    rig.cycles(3)
    assert len(rig.worker.inflight) == 6  # 8 slots, 2 kept back
    _feed(rig, [_request("high", 2, Priority.HIGH)])
    assert _steps_to_finish(rig, "high") <= 4
    assert not [s for s in rig.of(RequestStatus) if "preempted" in (s.detail or "")]
    rig.settle()
    assert rig.engine.peak_running == 7
    rig.settle()
    order = _finished_order(rig)
    assert order.index("high") < order.index("low4")


def test_the_buffer_reads_ahead_by_default_and_keeps_the_deep_part_as_bytes() -> None:
    rig = _rig(max_inflight=2)
    # Far more than the engine and its decoded window (2 x max_inflight, at least 64).
    assert rig.worker.buffer.capacity >= 8192
    _feed(rig, [_request(f"low{i}", 3, tenant="a") for i in range(300)] + [_request("b0", 3, tenant="b")])
    rig.cycles(3)
    items = {i.request_id: i for i in rig.worker.buffer.items()}
    assert "b0" in items  # behind all of tenant a's backlog, and already in reach of the order
    # The first 64 to arrive stay decoded; the rest, b0 included, are kept as bytes.
    assert all(i.decoded == (rid.startswith("low") and int(rid[3:]) < 64) for rid, i in items.items())
    assert items["b0"].request.tenant == "b" and items["b0"].decoded  # decoded again when read
    rig.settle(cycles=5_000)
    order = _finished_order(rig)
    # Fair share: b's turn comes after one quantum of a's tokens (not after a's whole backlog).
    assert len(order) == 301
    assert order.index("b0") <= QUANTUM // token_cost(_request("low0", 3)) + 2 < 300


@pytest.mark.parametrize("limit", [{"buffer_per_priority": 16}, {"buffer_mib_per_priority": 1}])
def test_a_full_priority_rewinds_and_nothing_past_the_buffer_is_committed(limit: dict[str, int]) -> None:
    rig = _rig(max_inflight=1, engine=limit)
    # By count, or by bytes (requests padded so that 1 MiB holds about 20 of them).
    pad = {} if "buffer_per_priority" in limit else {"metadata": {"pad": "x" * 50_000}}
    capacity = 16 if pad == {} else 21
    _feed(rig, [_request(f"low{i}", 3, **pad) for i in range(capacity * 3)])
    rig.cycles(2)
    # The partition is paused and rewound at the first request that did not fit: nothing beyond
    # what is buffered or running was taken, so nothing beyond it can be committed.
    assert len(rig.worker.buffer) + len(rig.worker.inflight) <= capacity + 1
    assert Priority.LOW in rig.worker.flow.paused
    rig.loop.commit(asynchronous=False)
    assert rig.committed() <= capacity + 1
    rig.settle(cycles=20_000)
    assert len(rig.of(InferenceResult)) == capacity * 3 and rig.committed() == capacity * 3


def test_aging_raises_the_priority_the_engine_sees() -> None:
    rig = _rig(max_inflight=4)
    _feed(rig, [_request("old-low", 1, created_at=utcnow() - timedelta(seconds=65))])
    rig.settle()
    # Two aging periods (30 s each) would lift it to high; aging stops at normal.
    assert rig.engine.added[0].priority == Priority.NORMAL.rank


def test_cancelled_and_expired_running_requests_are_aborted_and_billed() -> None:
    rig = _rig(max_inflight=4, cancels=True)
    soon = utcnow() + timedelta(milliseconds=300)
    _feed(rig, [_request("cancel-me", 10_000), _request("late", 10_000, deadline=soon), _request("ok", 3)])
    rig.cycles(4)
    assert "cancel-me" in rig.worker.inflight
    cancel = RequestStatus.of("cancel-me", RequestState.CANCELLED, detail="no longer needed")
    rig.broker.append(TOPICS.cancellations, SERDE.encode(cancel), b"cancel-me")
    import time

    deadline = time.monotonic() + 5
    while len(rig.worker.inflight) and time.monotonic() < deadline:
        rig.cycles(1)
        time.sleep(0.01)
    rig.settle()
    results = {r.request_id: r for r in rig.of(InferenceResult)}
    assert results["ok"].status == "succeeded"
    assert results["cancel-me"].error == "cancelled: no longer needed"
    assert results["late"].error is not None and results["late"].error.startswith("deadline_expired: ")
    metrics = {m.request_id: m for m in rig.of(CostMetric)}
    for rid in ("cancel-me", "late"):
        assert 0 < metrics[rid].output_tokens < 10_000 and metrics[rid].cost_usd > 0
    reasons = {d.request_id: d.reason.value for d in rig.of(DeadLetter)}
    assert reasons == {"cancel-me": "cancelled", "late": "deadline_expired"}
    assert not rig.engine.has_unfinished()


def test_per_request_engine_time_adds_up_to_the_engine_time() -> None:
    rig = _rig(max_inflight=3, token_seconds=0.002)
    _feed(rig, [_request(f"r{i}", n) for i, n in enumerate([5, 1, 9, 3, 3, 7, 2])])
    rig.settle()
    metrics = rig.of(CostMetric)
    assert len(metrics) == 7
    total_ms = sum(m.engine_ms for m in metrics)
    assert total_ms == pytest.approx(rig.worker.inflight.engine_seconds * 1000, rel=1e-6)
    # A request that ran longer, beside others, was charged more.
    by_id = {m.request_id: m for m in metrics}
    assert by_id["r2"].engine_ms > by_id["r1"].engine_ms
    assert all(1 <= m.batch_size <= 3 for m in metrics)


def test_a_request_that_kills_the_engine_is_isolated_and_the_others_finish() -> None:
    rig = _rig(max_inflight=8)
    reqs = [_request(f"r{i}", 3) for i in range(8)]
    reqs[5] = InferenceRequest(
        request_id="poison",
        priority=Priority.LOW,
        messages=[ChatMessage(role="user", content=f"a {POISON_PILL}")],
        max_tokens=3,
        route=Route(model="m", reason="test"),
    )
    _feed(rig, reqs)
    rig.settle()
    results = {r.request_id: r for r in rig.of(InferenceResult)}
    assert sorted(results) == sorted(r.request_id for r in reqs if r.request_id != "poison")
    assert all(r.status == "succeeded" and r.attempt == 0 for r in results.values())
    (retry,) = rig.of(InferenceRequest)
    assert retry.request_id == "poison" and retry.attempt == 1
    # Halving 8 suspects: the culprit is alone after log2(8) = 3 deaths.
    assert rig.engine.restarts <= 4
    assert rig.committed() == 8


def test_draining_finishes_what_it_can_and_hands_the_rest_back() -> None:
    rig = _rig(max_inflight=4, token_seconds=0.001)
    rig.worker.settings = rig.worker.settings.evolve(engine={"drain_s": 0.2})
    _feed(rig, [_request("short", 2), _request("endless", 30_000), _request("queued", 1)])
    rig.cycles(1)
    rig.loop.finish()  # a graceful stop: drain, flush, commit
    assert sorted(_finished_order(rig)) == ["queued", "short"]
    assert not rig.engine.has_unfinished()
    # "endless" (offset 1) is put back at the end of its partition, without a result: the next
    # owner runs it, and "queued" (offset 2), finished behind it, is committed and not run twice.
    low = rig.broker.messages(LOW[0])
    assert [SERDE.decode(InferenceRequest, m.value()).request_id for m in low] == [
        "short",
        "endless",
        "queued",
        "endless",
    ]
    assert rig.committed() == 3


def test_a_revoked_partition_hands_its_running_requests_back_to_the_next_owner() -> None:
    rig = _rig(max_inflight=4)
    _feed(rig, [_request("a", 300), _request("b", 300)])
    rig.cycles(2)
    assert len(rig.worker.inflight) == 2
    # A second consumer joins the group and takes the low partition over.
    other = _rig_sharing(rig)
    rig.cycles(1)  # the revocation is served on the next fetch
    assert len(rig.worker.inflight) == 0 and not rig.engine.has_unfinished()
    assert rig.of(InferenceResult) == []
    assert rig.committed() == 2  # past both: their copies at offsets 2 and 3 are the next owner's
    other.settle()
    assert sorted(r.request_id for r in rig.of(InferenceResult)) == ["a", "b"]


def _rig_sharing(rig: Rig) -> Rig:
    """A second GPU consumer in the same group, on the same stub broker."""
    settings = rig.worker.settings
    engine = RecordingEngine("m", max_model_len=100_000, max_inflight=4, token_seconds=0)
    worker = GpuWorker(
        settings,
        Catalog(models=[rig.worker.entry]),
        "m",
        engine,
        serde=SERDE,
        producer=rig.broker.producer(),
        watch_cancellations=False,
    )
    loop = worker.loop(rig.broker.consumer(GROUP))
    loop.start()
    return Rig(rig.broker, worker, engine, loop)
