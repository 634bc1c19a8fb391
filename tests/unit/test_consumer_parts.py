from __future__ import annotations

from datetime import timedelta

from gpu_consumers.buffer import Buffered, PriorityBuffer
from gpu_consumers.engine import EngineRequest
from gpu_consumers.instant_engine import InstantTestEngine
from schemas import ChatMessage, DeadLetterReason, InferenceRequest, utcnow


def item(priority: str, n: int, age_s: float = 0) -> Buffered:
    r = InferenceRequest(
        request_id=f"{priority}{n}",
        priority=priority,  # type: ignore[arg-type]
        messages=[ChatMessage(role="user", content="x")],
        created_at=utcnow() - timedelta(seconds=age_s),
    )
    return Buffered(f"m.{priority}", 0, n, b"", r, arrived=float(n))


def test_batches_take_high_then_normal_then_low() -> None:
    buf = PriorityBuffer(capacity_per_priority=10, aging_s=0)
    for i in range(3):
        buf.add(item("low", i))
        buf.add(item("normal", 10 + i))
        buf.add(item("high", 20 + i))
    ids = [b.request.request_id for b in buf.take(5, utcnow())]
    assert ids == ["high20", "high21", "high22", "normal10", "normal11"]
    assert [b.request.request_id for b in buf.take(5, utcnow())] == [
        "normal12",
        "low0",
        "low1",
        "low2",
    ]


def test_aging_promotes_starved_low_priority() -> None:
    buf = PriorityBuffer(capacity_per_priority=10, aging_s=10)
    buf.add(item("low", 0, age_s=25))  # two aging periods: up to normal (no higher), earlier arrival
    buf.add(item("high", 5))
    buf.add(item("normal", 6, age_s=5))
    assert [b.request.request_id for b in buf.take(3, utcnow())] == ["high5", "low0", "normal6"]


def test_buffer_capacity_and_hysteresis() -> None:
    buf = PriorityBuffer(capacity_per_priority=4, aging_s=0)
    for i in range(4):
        buf.add(item("low", i))
    assert buf.full(2) and not buf.has_room(2) and not buf.full(0)
    buf.take(3, utcnow())
    assert buf.has_room(2)


def test_instant_engine_reports_context_overflow_per_request() -> None:
    engine = InstantTestEngine("m", max_model_len=20)
    ok = EngineRequest(request_id="a", messages=[{"role": "user", "content": "short"}], max_tokens=4)
    long = EngineRequest(request_id="b", messages=[{"role": "user", "content": "w " * 50}], max_tokens=4)
    assert engine.add(ok) is None
    refused = engine.add(long)
    assert refused is not None and refused.error_kind is DeadLetterReason.CONTEXT_OVERFLOW
    assert engine.has_unfinished() and not engine.step()  # one token of four
