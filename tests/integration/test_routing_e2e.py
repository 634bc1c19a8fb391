"""Dedupe, cache, routing, priority and status on the real broker and ClickHouse.

The engine is the named instant test double with a fixed time per batch, so the broker, the
Faust processor and the consumer's scheduling are what these tests exercise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from analytics.store import Store
from producers import SluiceClient
from sluice.local.stack import LocalStack
from tests.integration.helpers import results, topic_keys
from tests.support import cli_json, run_cli, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _model_topics(stack: LocalStack) -> list[str]:
    return [t for m in stack.catalog for t in stack.topics.model_topics(m.name)]


def _slow_engine(token_seconds: float) -> dict[str, Any]:
    return {"engine": {"instant_token_seconds": token_seconds}}


def test_duplicates_run_once_and_every_submitter_gets_a_result(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = make_stack(**_slow_engine(0.04))
    client = SluiceClient(stack.settings)
    unique = [client.submit(f"question {i} about streams", tenant="dd", max_tokens=8) for i in range(10)]
    # k = 6 duplicates: 4 exact content repeats and 2 repeats of an idempotency key.
    dups = [client.submit(f"question {i} about streams", tenant="dd", max_tokens=8) for i in (0, 0, 3, 7)]
    keyed = client.submit("first wording", tenant="dd", idempotency_key="order-42", max_tokens=8)
    dups += [client.submit("retried wording", tenant="dd", idempotency_key="order-42", max_tokens=8) for _ in range(2)]
    # Same content, other tenant: never shared across tenants by default, so it runs.
    other_tenant = client.submit("question 0 about streams", tenant="dd-other", max_tokens=8)
    client.flush()
    everyone = [*unique, keyed, other_tenant, *dups]

    rows = wait_until(
        lambda: results(clickhouse_store, everyone),
        lambda r: len(r) == len(everyone),
        timeout=120,
        what="a result for every submission",
    )
    assert all(r["status"] == "succeeded" for r in rows.values())
    # Whichever copy the processor saw first ran; every other copy points at it.
    groups = [
        [unique[0], dups[0], dups[1], other_tenant],
        [unique[3], dups[2]],
        [unique[7], dups[3]],
        [keyed, dups[4], dups[5]],
    ]
    ran = {rid for rid, r in rows.items() if r["deduplicated_from"] is None}
    assert len(ran) == len(everyone) - len(dups)
    for group in groups:
        same_tenant = [g for g in group if g != other_tenant]
        (original,) = [g for g in same_tenant if g in ran]
        for g in same_tenant:
            if g != original:
                assert rows[g]["deduplicated_from"] == original
                assert rows[g]["output_text"] == rows[original]["output_text"]
    assert other_tenant in ran  # the same content in another tenant is not shared by default
    # N submissions, k duplicates: exactly N - k requests reached a model topic (engine runs).
    engine_runs = topic_keys(stack.settings, _model_topics(stack))
    assert sorted(engine_runs) == sorted(ran)

    saved = clickhouse_store.query(
        "SELECT countIf(deduplicated OR cached), sumIf(input_tokens + output_tokens, deduplicated OR cached), "
        "sumIf(cost_usd, deduplicated OR cached) FROM sluice.cost_metrics FINAL WHERE tenant = 'dd'"
    ).rows[0]
    assert saved[0] == len(dups) and saved[1] > 0 and saved[2] == 0

    # The same figures through `sluice stats` (another process, through the stack's query
    # endpoint), which reads the hourly rollup once the sink has refreshed it.
    (row,) = wait_until(
        lambda: cli_json(stack.settings, "stats", "--view", "savings", "--tenant", "dd"),
        lambda rows: len(rows) == 1 and rows[0]["requests"] == len(everyone) - 1,
        timeout=60,
        what="the rollup to hold tenant dd's requests",
    )
    assert (row["requests"], row["engine_runs"], row["duplicates"], row["cache_hits"]) == (
        len(everyone) - 1,  # the other tenant's request is not in tenant dd
        len(ran) - 1,
        len(dups),
        0,
    )
    assert row["saved_dedupe_usd"] > 0 and row["saved_routing_usd"] >= 0 and row["tokens_not_run"] == saved[1]


def test_a_cache_hit_never_touches_a_model_topic(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = make_stack()
    client = SluiceClient(stack.settings)
    first = client.submit("What is a consumer group?", tenant="cache")
    client.flush()
    wait_until(lambda: results(clickhouse_store, [first]), timeout=90, what="the first answer")
    hit = client.submit("What is a consumer group?", tenant="cache")
    opted_out = client.submit("What is a consumer group?", tenant="cache", cache=False)
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, [hit, opted_out]), lambda r: len(r) == 2, timeout=90, what="repeats"
    )
    assert rows[hit]["cached"] and rows[hit]["deduplicated_from"] == first
    assert not rows[opted_out]["cached"] and rows[opted_out]["deduplicated_from"] is None
    assert sorted(topic_keys(stack.settings, _model_topics(stack))) == sorted([first, opted_out])

    # `sluice status` shows the lifecycle from the status topic (through ClickHouse).
    def status(rid: str) -> list[str]:
        proc = run_cli(stack.settings, "status", rid, "--format", "json", timeout=60)
        return [json.loads(line)["state"] for line in proc.stdout.splitlines() if line.startswith("{")]

    assert wait_until(lambda: status(hit), lambda s: "cached" in s, timeout=30, what="cached status") == [
        "queued",
        "cached",
    ]
    states = wait_until(lambda: status(first), lambda s: "succeeded" in s, timeout=30, what="first's status")
    assert states == ["queued", "routed", "running", "succeeded"]


def test_simple_requests_go_to_the_cheap_model_and_hard_or_long_ones_to_the_capable_model(
    stack: LocalStack, clickhouse_store: Store
) -> None:
    client = SluiceClient(stack.settings)
    simple = client.submit("What is the capital of France?", tenant="route", max_tokens=16)
    code = client.submit("Please do a code review of: def add(a, b): return a - b", tenant="route", max_tokens=16)
    long_doc = client.submit("Summarize this: " + "the broker stores the log. " * 160, tenant="route")
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, [simple, code, long_doc]),
        lambda r: len(r) == 3,
        timeout=90,
        what="routed results",
    )
    assert rows[simple]["model"] == "tiny" and "cheapest capable: tiny" in rows[simple]["route_reason"]
    assert rows[code]["model"] == "big" and "code" in rows[code]["route_reason"]
    assert "tier >= 2" in rows[code]["route_reason"]
    # ~1100 tokens of input + output do not fit tiny's 1024-token context.
    assert rows[long_doc]["model"] == "big" and "summarization" in rows[long_doc]["route_reason"]
    savings = clickhouse_store.query(
        "SELECT sum(baseline_cost_usd) > sum(cost_usd) FROM sluice.cost_metrics FINAL WHERE tenant = 'route'"
    ).rows[0][0]
    assert savings


def test_high_priority_overtakes_a_low_priority_backlog_and_low_still_finishes(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = make_stack(**_slow_engine(0.05))
    client = SluiceClient(stack.settings)
    low = [client.submit(f"low {i}", priority="low", tenant="prio", cache=False, max_tokens=4) for i in range(240)]
    client.flush()
    # Wait until the backlog is being worked on, then submit high-priority requests behind it.
    wait_until(lambda: len(results(clickhouse_store, low)), lambda n: n >= 16, timeout=90, what="low work started")
    high = [client.submit(f"high {i}", priority="high", tenant="prio", cache=False, max_tokens=4) for i in range(12)]
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, [*low, *high]),
        lambda r: len(r) == len(low) + len(high),
        timeout=180,
        what="every low and high result",
    )
    high_done = max(rows[h]["completed_at"] for h in high)
    low_after = sum(1 for i in low if rows[i]["completed_at"] > high_done)
    # 240 low, 8 at a time at 0.2 s each, is ~6 s of work; high must not queue behind it.
    assert low_after >= 100, f"only {low_after} low requests finished after the last high one"
    assert all(rows[i]["status"] == "succeeded" for i in low)
