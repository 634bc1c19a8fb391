"""The order requests leave a GPU consumer's buffer (priority with aging, deadlines by slack,
tenants by weighted fair share) and the at-risk estimate, on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gpu_consumers.buffer import QUANTUM, Buffered, PriorityBuffer, token_cost
from gpu_consumers.pace import DecodePace
from schemas import InferenceRequest, Priority

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def req(
    rid: str,
    *,
    tenant: str = "a",
    priority: str = "low",
    deadline_s: float | None = None,
    max_tokens: int = 100,
    created_s: float = 0.0,
) -> InferenceRequest:
    return InferenceRequest(
        request_id=rid,
        tenant=tenant,
        priority=priority,
        messages=[{"role": "user", "content": "x" * 40}],
        max_tokens=max_tokens,
        created_at=T0 + timedelta(seconds=created_s),
        deadline=None if deadline_s is None else T0 + timedelta(seconds=deadline_s),
    )


def item(r: InferenceRequest, arrived: float = 0.0) -> Buffered:
    return Buffered("t", 0, 0, b"", r, arrived)


def drain(buf: PriorityBuffer, now: datetime) -> list[str]:
    out = []
    while len(buf):
        out += [i.request.request_id for i in buf.take(1, now)]
    return out


def test_without_deadlines_or_tenants_it_is_priority_then_arrival_order() -> None:
    buf = PriorityBuffer(100, aging_s=0)
    for i, (p, t) in enumerate([("low", 0), ("high", 1), ("low", 2), ("normal", 3), ("high", 4)]):
        buf.add(item(req(f"{p}{t}", priority=p, created_s=t), arrived=i))
    assert drain(buf, T0) == ["high1", "high4", "normal3", "low0", "low2"]


def test_a_tight_deadline_goes_before_older_work_and_hours_of_slack_go_after() -> None:
    pace = DecodePace(margin_s=0)
    pace.observe(0.1, running=8)  # 10 tokens/s per sequence: 100 tokens take 10 s
    buf = PriorityBuffer(100, aging_s=0, service_s=pace.service_s, patience_s=600)
    buf.add(item(req("old-no-deadline", created_s=-100)))
    buf.add(item(req("hours", deadline_s=3 * 3600)))
    buf.add(item(req("tight", deadline_s=120)))
    buf.add(item(req("tighter", deadline_s=60)))
    buf.add(item(req("new-no-deadline", created_s=5)))
    assert drain(buf, T0) == ["tighter", "tight", "old-no-deadline", "new-no-deadline", "hours"]


def test_slack_counts_the_expected_service_time() -> None:
    pace = DecodePace(margin_s=0)
    pace.observe(0.1, running=1)
    buf = PriorityBuffer(100, aging_s=0, service_s=pace.service_s)
    # Same deadline, but one needs 100 s of generation and the other 1 s: the long one must start first.
    buf.add(item(req("short", deadline_s=300, max_tokens=10)))
    buf.add(item(req("long", deadline_s=300, max_tokens=1000)))
    assert drain(buf, T0) == ["long", "short"]


def test_ties_keep_arrival_order() -> None:
    buf = PriorityBuffer(100, aging_s=0)
    for i in range(5):
        buf.add(item(req(f"r{i}", deadline_s=100)))
    assert drain(buf, T0) == [f"r{i}" for i in range(5)]


def test_priority_stays_above_deadlines_and_aging_lifts_a_waiting_tier() -> None:
    buf = PriorityBuffer(100, aging_s=30)
    buf.add(item(req("low-urgent", priority="low", deadline_s=5)))
    buf.add(item(req("high", priority="high", created_s=0)))
    assert drain(buf, T0) == ["high", "low-urgent"]
    buf.add(item(req("low-old", priority="low", created_s=-70), arrived=0))
    buf.add(item(req("high-new", priority="high", created_s=0), arrived=1))
    buf.add(item(req("normal-new", priority="normal", created_s=0), arrived=2))
    # 70 s old: two aging periods, but aging stops at normal: level with normal (the earlier
    # arrival goes first), never above high.
    assert drain(buf, T0) == ["high-new", "low-old", "normal-new"]


def test_a_tenants_backlog_does_not_starve_another_tenant_of_the_same_priority() -> None:
    buf = PriorityBuffer(10_000, aging_s=0)
    for i in range(1000):
        buf.add(item(req(f"a{i}", tenant="a", created_s=i * 0.001)))
    for i in range(10):
        buf.add(item(req(f"b{i}", tenant="b", created_s=10 + i)))
    first = [i.request.tenant for i in buf.take(40, T0)]
    # Equal weights, equal tokens per turn (a quantum holds 9 of these requests): B's ten are out
    # within two turns each, not behind A's thousand.
    assert first[:30].count("b") == 10


def test_weights_share_tokens_in_proportion_and_a_tenant_alone_gets_everything() -> None:
    weights = {"big": 3.0, "small": 1.0}
    buf = PriorityBuffer(10_000, aging_s=0, weight=lambda t: weights.get(t, 1.0))
    for i in range(4000):
        buf.add(item(req(f"big{i}", tenant="big")))
        buf.add(item(req(f"small{i}", tenant="small")))
    taken = [i.request.tenant for i in buf.take(4000, T0)]
    assert abs(taken.count("big") / taken.count("small") - 3.0) < 0.1
    alone = PriorityBuffer(100, aging_s=0)
    for i in range(50):
        alone.add(item(req(f"x{i}", tenant="solo")))
    assert len(alone.take(50, T0)) == 50


def test_a_zero_weight_tenant_runs_only_when_nobody_else_waits() -> None:
    buf = PriorityBuffer(100, aging_s=0, weight=lambda t: 0.0 if t == "background" else 1.0)
    buf.add(item(req("bg1", tenant="background", created_s=-10)))
    buf.add(item(req("fg1", tenant="fg")))
    buf.add(item(req("bg2", tenant="background", created_s=-5)))
    buf.add(item(req("fg2", tenant="fg", created_s=1)))
    assert drain(buf, T0) == ["fg1", "fg2", "bg1", "bg2"]


def test_a_tenant_that_leaves_loses_its_credit() -> None:
    buf = PriorityBuffer(100, aging_s=0)
    big = req("big", tenant="a", max_tokens=5000)  # costlier than several quanta
    buf.add(item(big))
    buf.add(item(req("b1", tenant="b")))
    out = drain(buf, T0)
    assert sorted(out) == ["b1", "big"] and token_cost(big) > QUANTUM
    tier = buf._tiers[big.priority.rank]
    assert tier.deficit == {} and not tier.ring  # both left: no credit kept


def test_urgent_requests_skip_the_tenants_round() -> None:
    buf = PriorityBuffer(1000, aging_s=0, urgent_s=30)
    for i in range(20):
        buf.add(item(req(f"a{i}", tenant="a")))
    buf.add(item(req("late", tenant="b", deadline_s=20)))
    assert buf.take(1, T0)[0].request.request_id == "late"


def test_drop_and_pop_where_keep_the_rest_in_order() -> None:
    buf = PriorityBuffer(100, aging_s=0)
    for i in range(6):
        buf.add(Buffered("t", i % 2, i, b"", req(f"r{i}", created_s=i), float(i)))
    assert buf.drop({("t", 1)}) == 3
    assert drain(buf, T0) == ["r0", "r2", "r4"]


def test_at_risk_is_said_once_with_the_measured_speed() -> None:
    pace = DecodePace(margin_s=30)
    r = req("r", deadline_s=100, max_tokens=200)
    assert pace.at_risk(r, T0) is None  # nothing measured yet: no estimate
    for _ in range(100):
        pace.observe(0.5, running=4)  # 2 tokens/s: 200 tokens take 100 s
    assert pace.tokens_per_second == 2.0
    slack = pace.at_risk(r, T0)
    assert slack is not None and abs(slack - 0.0) < 1e-6
    assert pace.at_risk(r, T0) is None  # once per request
    # Running with most of its tokens done: 40 left take 20 s, 100 s left: not at risk.
    assert pace.at_risk(req("s", deadline_s=100, max_tokens=200), T0, generated=160) is None
    assert pace.at_risk(req("u"), T0) is None  # no deadline: never at risk


def test_a_request_past_its_due_time_gets_no_precedence() -> None:
    pace = DecodePace(margin_s=0)
    pace.observe(0.1, running=1)
    buf = PriorityBuffer(100, aging_s=0, service_s=pace.service_s, urgent_s=30)
    buf.add(item(req("b-first", tenant="b", created_s=-50)))
    buf.add(item(req("hopeless", tenant="a", deadline_s=5, max_tokens=1000)))  # needs 100 s, has 5
    buf.add(item(req("savable", tenant="c", deadline_s=20, max_tokens=100)))  # needs 10 s, has 20
    assert [i.request.request_id for i in buf.take(1, T0)] == ["savable"]


def test_with_both_off_it_is_arrival_order_as_before() -> None:
    buf = PriorityBuffer(100, aging_s=0, deadlines=False, fair=False, urgent_s=60)
    buf.add(item(req("a1", tenant="a")))
    buf.add(item(req("a2", tenant="a")))
    buf.add(item(req("b-tight", tenant="b", deadline_s=10)))
    assert drain(buf, T0) == ["a1", "a2", "b-tight"]


def test_a_tenant_that_arrives_waits_at_most_the_current_turn() -> None:
    buf = PriorityBuffer(10_000, aging_s=0)
    for i in range(100):
        buf.add(item(req(f"a{i}", tenant="a")))
    taken = [i.request.tenant for i in buf.take(3, T0)]  # A's turn has begun
    buf.add(item(req("b0", tenant="b")))
    taken += [i.request.tenant for i in buf.take(12, T0)]
    # A quantum holds 9 of A's requests (110 tokens each): B runs right after A's turn.
    assert taken.index("b") <= 9, taken


# -- at risk when routed ------------------------------------------------------------------------


def _review(on_risk: str = "escalate", *, big_backlog: int = 0) -> tuple[Any, Any, Any]:
    from core.catalog import Catalog
    from core.settings import TenantSettings
    from core.topics import Topics
    from schemas import Serde
    from stream_processors.emit import Emitter
    from stream_processors.risk import EnginePace, RiskReview
    from stream_processors.router import Router
    from tests.support import model_entry

    catalog = Catalog(models=[model_entry("small", tier=1), model_entry("big", tier=1, input_price_per_1m=5)])
    router = Router(catalog)
    clock = [1000.0]
    pace = EnginePace(clock=lambda: clock[0])
    for i in range(21):  # small finishes 2 requests a second, 0.1 s a token
        clock[0] = 1000.0 + i * 0.5
        pace.observe(_done("small", i))
        pace.observe(_done("big", i))
    for i in range(100):
        router.backlog.routed("small", f"s{i}", priority=Priority.LOW)
    for i in range(big_backlog):
        router.backlog.routed("big", f"b{i}", priority=Priority.LOW)
    emit = Emitter(Topics("r."), Serde(), catalog)
    review = RiskReview(router, catalog, emit, default=on_risk, margin_s=10, tenancy=TenantSettings(), pace=pace)
    return review, router, catalog


def _done(model: str, i: int) -> Any:
    from schemas import InferenceResult, ResultStatus

    r = req(f"done{i}")
    return InferenceResult.for_request(
        r,
        model=model,
        status=ResultStatus.SUCCEEDED,
        started_at=T0,
        completed_at=T0 + timedelta(seconds=2),
        completion_tokens=20,
        engine_run_id="run",
    )


def _routed(r: InferenceRequest, router: Any) -> InferenceRequest:
    r.route = router.route(r)
    return r


def test_a_deadline_the_backlog_would_miss_is_escalated_once_and_said() -> None:
    review, router, _ = _review()
    # 100 low requests ahead at 2 a second: about 50 s, plus 10 tokens at 0.1 s; 30 s is not enough.
    r = _routed(req("late", deadline_s=30, max_tokens=10), router)
    out = review.review(r, T0)
    assert r.priority is Priority.NORMAL and r.metadata["escalated_from"] == "low"
    (status,) = [o.record for o in out]
    assert status.state == "at_risk" and "escalated to normal" in (status.detail or "")
    assert review.review(r, T0) == []  # once
    roomy = _routed(req("roomy", deadline_s=3600, max_tokens=10), router)
    assert review.review(roomy, T0) == [] and roomy.priority is Priority.LOW
    assert review.review(_routed(req("none", max_tokens=10), router), T0) == []  # no deadline


def test_none_only_says_it_and_reroute_takes_a_model_that_would_make_it() -> None:
    review, router, _ = _review("none")
    r = _routed(req("late", deadline_s=30, max_tokens=10), router)
    (status,) = [o.record for o in review.review(r, T0)]
    assert r.priority is Priority.LOW and r.route is not None and r.route.model == "small"
    assert "escalated" not in (status.detail or "")
    review, router, _ = _review("reroute")
    r = _routed(req("late", deadline_s=30, max_tokens=10), router)
    (status,) = [o.record for o in review.review(r, T0)]
    assert r.route is not None and r.route.model == "big" and "rerouted from small" in r.route.reason
    assert "rerouted to big" in (status.detail or "")
    # When the other model is as deep in work, nothing is rerouted, and it says so.
    review, router, _ = _review("reroute", big_backlog=100)
    r = _routed(req("late", deadline_s=30, max_tokens=10), router)
    (status,) = [o.record for o in review.review(r, T0)]
    assert r.route is not None and r.route.model == "small" and "no other capable model" in (status.detail or "")


def test_a_request_may_choose_its_policy() -> None:
    review, router, _ = _review("escalate")
    r = _routed(req("late", deadline_s=30, max_tokens=10), router)
    r.metadata["on_risk"] = "none"
    review.review(r, T0)
    assert r.priority is Priority.LOW and r.metadata["at_risk"] == "none"
