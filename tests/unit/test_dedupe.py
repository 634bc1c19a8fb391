"""The dedupe stage's logic over a plain dict (the Faust table in production)."""

from __future__ import annotations

from typing import Any

from core.catalog import Catalog
from core.kafka import Out
from core.placement import dedupe_key
from core.settings import ProcessorSettings
from core.topics import Topics
from schemas import ChatMessage, CostMetric, InferenceRequest, InferenceResult, RequestStatus, Route, Serde, utcnow
from stream_processors.dedupe import DedupeStage
from stream_processors.emit import Emitter
from tests.support import model_entry

CATALOG = Catalog(
    models=[
        model_entry("cheap", tier=1, context_length=1000, input_price_per_1m=1, output_price_per_1m=2),
        model_entry("big", tier=3, context_length=9000, input_price_per_1m=10, output_price_per_1m=20),
    ]
)
SERDE = Serde()
TOPICS = Topics("u.")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stage(**settings: Any) -> tuple[DedupeStage, dict[str, Any], Clock]:
    table: dict[str, Any] = {}
    clock = Clock()
    ps = ProcessorSettings.model_validate(settings)
    return DedupeStage(table, Emitter(TOPICS, SERDE, CATALOG), ps, clock=clock), table, clock


def req(content: str = "same", **kw: Any) -> InferenceRequest:
    r = InferenceRequest.model_validate({"messages": [ChatMessage(role="user", content=content)], **kw})
    r.route = Route(model="cheap", reason="test")
    r.dedupe_key = dedupe_key(r, ProcessorSettings())
    return r


def result_for(r: InferenceRequest, status: str = "succeeded") -> InferenceResult:
    now = utcnow()
    return InferenceResult.model_validate(
        {
            "request_id": r.request_id,
            "tenant": r.tenant,
            "priority": r.priority,
            "model": "cheap",
            "status": status,
            "output_text": "answer",
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "created_at": r.created_at,
            "started_at": now,
            "completed_at": now,
            "dedupe_key": r.dedupe_key,
            "batch_id": "b1",
        }
    )


def topics_of(fwds: list[Out]) -> list[str]:
    return [f.topic for f in fwds]


def results_in(fwds: list[Out]) -> list[InferenceResult]:
    return [SERDE.decode(InferenceResult, f.value(SERDE)) for f in fwds if f.topic == TOPICS.results]


def test_duplicates_in_flight_run_once_and_each_gets_its_own_result() -> None:
    s, table, _ = stage()
    original, dup1, dup2 = req(), req(), req(priority="high")
    first = s.on_request(original, SERDE.encode(original), 0)
    assert topics_of(first) == ["u.model.cheap.normal", TOPICS.status]
    for d in (dup1, dup2):
        out = s.on_request(d, SERDE.encode(d), 0)
        assert topics_of(out) == [TOPICS.status]
        assert SERDE.decode(RequestStatus, out[0].value(SERDE)).state == "deduplicated"
    # A redelivered duplicate is not attached twice.
    s.on_request(dup1, SERDE.encode(dup1), 0)
    assert len(table[original.dedupe_key or ""]["waiters"]) == 2

    out = s.on_completed(result_for(original))
    results = results_in(out)
    assert {r.request_id for r in results} == {dup1.request_id, dup2.request_id}
    assert all(r.deduplicated_from == original.request_id and r.output_text == "answer" for r in results)
    assert {r.priority for r in results} == {"normal", "high"}
    metrics = [SERDE.decode(CostMetric, f.value(SERDE)) for f in out if f.topic == TOPICS.cost_metrics]
    assert all(m.deduplicated and m.cost_usd == 0 and m.baseline_cost_usd > 0 for m in metrics)
    # Redelivered completion: nothing more.
    assert s.on_completed(result_for(original)) == []


def test_a_repeat_after_success_is_a_cache_hit_without_a_model_topic() -> None:
    s, _, _ = stage()
    original = req()
    s.on_request(original, SERDE.encode(original), 0)
    s.on_completed(result_for(original))
    again = req()
    out = s.on_request(again, SERDE.encode(again), 0)
    assert not any(t.startswith("u.model.") for t in topics_of(out))
    (hit,) = results_in(out)
    assert hit.cached and hit.request_id == again.request_id and hit.deduplicated_from == original.request_id
    assert SERDE.decode(RequestStatus, out[-1].value(SERDE)).state == "cached"


def test_cache_entries_expire_and_failures_are_not_cached() -> None:
    s, table, clock = stage(cache_ttl_s=60)
    a = req()
    s.on_request(a, SERDE.encode(a), 0)
    s.on_completed(result_for(a))
    clock.now += 61
    b = req()
    assert topics_of(s.on_request(b, SERDE.encode(b), 0))[0] == "u.model.cheap.normal"
    s.on_completed(result_for(b, status="failed"))
    assert table == {}
    c = req()
    assert topics_of(s.on_request(c, SERDE.encode(c), 0))[0] == "u.model.cheap.normal"


def test_opting_out_of_the_cache_means_no_content_key() -> None:
    assert dedupe_key(req(cache=False), ProcessorSettings()) is None
    assert dedupe_key(req(cache=False, idempotency_key="k"), ProcessorSettings()) == "idem:default:k"
    shared = ProcessorSettings(cache_shared_across_tenants=True)
    assert dedupe_key(req(tenant="a"), shared) == dedupe_key(req(tenant="b"), shared)
    assert dedupe_key(req(tenant="a"), ProcessorSettings()) != dedupe_key(req(tenant="b"), ProcessorSettings())
    assert dedupe_key(req(), ProcessorSettings(dedupe_enabled=False)) is None


def test_a_redelivered_original_is_forwarded_again() -> None:
    s, _, _ = stage()
    a = req()
    s.on_request(a, SERDE.encode(a), 0)
    assert topics_of(s.on_request(a, SERDE.encode(a), 0))[0] == "u.model.cheap.normal"


def test_sweep_touches_only_its_partition_and_runs_orphaned_duplicates_alone() -> None:
    s, table, clock = stage(inflight_ttl_s=100, cache_ttl_s=10, max_entries_per_partition=1)
    stuck, orphan = req("stuck"), req("stuck")
    s.on_request(stuck, SERDE.encode(stuck), 0)
    s.on_request(orphan, SERDE.encode(orphan), 0)
    other = req("other partition")
    s.on_request(other, SERDE.encode(other), 1)
    clock.now += 101
    out = s.sweep(0)
    assert [(f.topic, f.key_bytes()) for f in out] == [("u.model.cheap.normal", orphan.request_id.encode())]
    assert SERDE.decode(InferenceRequest, out[0].value(SERDE)).request_id == orphan.request_id
    assert list(table) == [other.dedupe_key]
    # The bound evicts the oldest cached results first.
    for i in range(3):
        r = req(f"q{i}")
        s.on_request(r, SERDE.encode(r), 0)
        s.on_completed(result_for(r))
        clock.now += 1
    s.sweep(0)
    assert [e["p"] for e in table.values()].count(0) == 1


def test_after_a_restart_duplicates_do_not_wait_on_a_recovered_running_entry() -> None:
    # One router process routes the original, then stops before its completion is recorded.
    before, table, clock = stage()
    a, b = req(), req()
    before.on_request(a, SERDE.encode(a), 0)
    assert table[a.dedupe_key or ""]["state"] == "running"
    # The next process recovers that table: a duplicate runs on its own instead of waiting on an
    # original whose completion may never come again.
    clock.now += 5
    after = DedupeStage(table, Emitter(TOPICS, SERDE, CATALOG), ProcessorSettings(), clock=clock)
    assert topics_of(after.on_request(b, SERDE.encode(b), 0))[0] == "u.model.cheap.normal"
    # Entries this process wrote itself still collect duplicates.
    fresh = req("other")
    after.on_request(fresh, SERDE.encode(fresh), 0)
    dup = req("other")
    assert "u.model.cheap.normal" not in topics_of(after.on_request(dup, SERDE.encode(dup), 0))
