"""Deadlines through the whole pipeline (instant engine with a per-token time): a tight deadline
behind a low backlog is met, and one that cannot be met is said ``at_risk`` before it expires."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

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
