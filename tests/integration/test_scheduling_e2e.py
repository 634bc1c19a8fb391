"""Deadlines through the whole pipeline (instant engine with a per-token time): a tight deadline
behind a low backlog is met, and one that cannot be met is said ``at_risk`` before it expires."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from producers import SluiceClient
from schemas import InferenceResult, RequestStatus, Serde, utcnow
from sluice.local.stack import LocalStack
from tests.integration.helpers import TopicCounter, topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.mark.parametrize("deadline_order", [True, False], ids=["deadline-order", "arrival-order"])
def test_a_tight_deadline_behind_a_low_backlog_and_a_hopeless_one(
    make_stack: Callable[..., LocalStack], serde: Serde, deadline_order: bool
) -> None:
    # 8 at a time, 40 tokens of 50 ms: 60 backlog requests are about 15 s of work, all of it
    # inside what the consumer fetches (8 running + 64 buffered), where the order is decided.
    stack = make_stack(
        engine={"instant_token_seconds": 0.05},
        consumer={"at_risk_margin_s": 4.0, "deadline_order": deadline_order},
    )
    results = TopicCounter(stack.settings, stack.topics.results)
    try:
        with SluiceClient(stack.settings) as client:
            backlog = [
                client.submit(f"bulk item {i}", model="tiny", priority="low", max_tokens=40, tenant="bulk", cache=False)
                for i in range(60)
            ]
            client.flush()
            # The engine is running the backlog, and its decode speed is measured.
            wait_until(results.counts, lambda c: sum(c[r] for r in backlog) >= 1, timeout=60, what="a first result")
            now = utcnow()
            tight = client.submit(
                "tight one",
                model="tiny",
                priority="low",
                max_tokens=10,
                deadline=now + timedelta(seconds=6),
                tenant="bulk",  # the backlog's tenant: the order is the deadline's doing, not fair share
                cache=False,
            )
            hopeless = client.submit(
                "hopeless one",
                model="tiny",
                priority="low",
                max_tokens=400,  # 20 s of generation
                deadline=now + timedelta(seconds=8),
                tenant="bulk",
                cache=False,
            )
            client.flush()
        wait_until(results.counts, lambda c: c[tight] >= 1 and c[hopeless] >= 1, timeout=90, what="both answered")
    finally:
        results.close()
    answers = {
        r.request_id: r
        for r in topic_records(stack.settings, stack.topics.results, InferenceResult, serde)
        if r.request_id in (tight, hopeless)
    }
    if deadline_order:
        tight_events = [
            (s.state, s.at.isoformat(), s.detail)
            for s in topic_records(stack.settings, stack.topics.status, RequestStatus, serde)
            if s.request_id == tight
        ]
        assert answers[tight].status == "succeeded", (answers[tight].error, tight_events)
    else:
        # The comparison: in arrival order the same request waits behind the backlog and expires.
        assert answers[tight].status == "failed" and (answers[tight].error or "").startswith("deadline_expired")
    assert answers[hopeless].status == "failed" and (answers[hopeless].error or "").startswith("deadline_expired")
    events = [
        s for s in topic_records(stack.settings, stack.topics.status, RequestStatus, serde) if s.request_id == hopeless
    ]
    states = [s.state for s in events]
    # Said once, before its deadline passed, with the estimate.
    assert states.count("at_risk") == 1 and states.index("at_risk") < states.index("expired"), states
    at_risk = next(s for s in events if s.state == "at_risk")
    assert "tokens/s" in (at_risk.detail or "")
    expired = next(s for s in events if s.state == "expired")
    assert at_risk.at < expired.at


@pytest.mark.parametrize("read_ahead", [64, None], ids=["read-ahead-64", "read-ahead-default"])
def test_a_deadline_behind_a_deep_backlog(
    make_stack: Callable[..., LocalStack], serde: Serde, read_ahead: int | None
) -> None:
    # 800 low requests of 1 s each, 8 at a time: 100 s of work. With a read-ahead of 64 (8
    # running + 64 buffered) a request written behind them is not seen for half a minute or more
    # (its partition's share of the backlog ahead of it, some 260 requests, has to be fetched
    # first, however unevenly the partitions are fetched): the router's
    # escalation is what saves it. With the default read-ahead (8,192) the consumer has the whole
    # backlog in view and its deadline order starts a tight request at once, escalated or not.
    engine: dict[str, Any] = {"instant_token_seconds": 0.05}
    if read_ahead is not None:
        engine["buffer_per_priority"] = read_ahead
    stack = make_stack(engine=engine, consumer={"at_risk_margin_s": 2.0})
    results = TopicCounter(stack.settings, stack.topics.results)
    try:
        with SluiceClient(stack.settings) as client:
            backlog = [
                client.submit(f"bulk item {i}", model="tiny", priority="low", max_tokens=20, tenant="bulk", cache=False)
                for i in range(800)
            ]
            client.flush()
            # Five waves finished (over four seconds): the router has measured how fast the model
            # finishes requests (it needs ten results spread over two seconds at least).
            wait_until(results.counts, lambda c: sum(c[r] for r in backlog) >= 40, timeout=60, what="five waves")
            now = utcnow()
            deadline = now + timedelta(seconds=10)
            escalated = client.submit(
                "tight, escalated", model="tiny", priority="low", max_tokens=10, deadline=deadline, cache=False
            )
            left_alone = client.submit(
                "tight, left alone",
                model="tiny",
                priority="low",
                max_tokens=10,
                deadline=deadline,
                metadata={"on_risk": "none"},
                cache=False,
            )
            client.flush()
        wait_until(
            results.counts, lambda c: c[escalated] >= 1 and c[left_alone] >= 1, timeout=120, what="both answered"
        )
        counts = results.counts()
        backlog_done = sum(counts[r] >= 1 for r in backlog)
    finally:
        results.close()
    answers = {
        r.request_id: r
        for r in topic_records(stack.settings, stack.topics.results, InferenceResult, serde)
        if r.request_id in (escalated, left_alone)
    }
    assert answers[escalated].status == "succeeded" and answers[escalated].priority == "normal"
    events = topic_records(stack.settings, stack.topics.status, RequestStatus, serde)
    said = {s.request_id: s.detail for s in events if s.state == "at_risk"}
    assert "escalated to normal" in (said[escalated] or "") and "escalated" not in (said[left_alone] or "")
    assert [s.state for s in events if s.request_id == escalated].count("at_risk") == 1
    if read_ahead is not None:
        assert answers[left_alone].status == "failed"
        assert (answers[left_alone].error or "").startswith("deadline_expired")
    else:
        # Met at its own priority, long before the backlog ahead of it in the log was through.
        assert answers[left_alone].status == "succeeded" and answers[left_alone].priority == "low"
        assert backlog_done < 300
