"""Retries, dead-letter replay and cancellation on the real broker and ClickHouse.

The engine is the named instant test double: ``FLAKY`` fails a request's first attempt only,
``POISON_PILL`` fails every attempt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from analytics.store import Store
from gpu_consumers.instant_engine import FLAKY, POISON_PILL
from producers import SluiceClient
from sluice.local.stack import LocalStack
from tests.integration.helpers import results
from tests.support import cli_json, run_cli, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def sluice(stack: LocalStack, *args: str) -> list[dict[str, Any]]:
    return cli_json(stack.settings, *args)


def statuses(store: Store, rid: str) -> list[tuple[str, str | None]]:
    rows = store.query(
        "SELECT state, detail FROM sluice.request_status FINAL WHERE request_id = {r:String} ORDER BY at",
        {"r": rid},
    ).rows
    return [(r[0], r[1]) for r in rows]


def test_transient_failures_are_retried_through_retry_topics_then_dead_lettered(
    stack: LocalStack, clickhouse_store: Store
) -> None:
    client = SluiceClient(stack.settings)
    flaky = client.submit(f"{FLAKY} but fine the second time", tenant="retry")
    poison = client.submit(f"always a {POISON_PILL}", tenant="retry")
    neighbours = [client.submit(f"neighbour {i}", tenant="retry") for i in range(6)]
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, [flaky, poison, *neighbours]),
        lambda r: len(r) == 8,
        timeout=120,
        what="every result",
    )
    assert rows[flaky]["status"] == "succeeded" and rows[flaky]["attempt"] == 1
    assert all(rows[n]["status"] == "succeeded" and rows[n]["attempt"] == 0 for n in neighbours)
    assert rows[poison]["status"] == "failed" and rows[poison]["attempt"] == 2
    assert "retries_exhausted" in rows[poison]["error"] and "after 3 attempt(s)" in rows[poison]["error"]
    dl = wait_until(
        lambda: (
            clickhouse_store.query(
                "SELECT reason, attempt, stage, source_topic FROM sluice.dead_letters FINAL "
                "WHERE request_id = {r:String}",
                {"r": poison},
            ).rows
        ),
        timeout=30,
        what="the poison pill's dead letter",
    )
    assert dl == [["retries_exhausted", 2, "consumer", stack.topics.model("tiny", "normal")]]
    flaky_states = statuses(clickhouse_store, flaky)
    assert any(s == "queued" and d and d.startswith("retry 1 of 2 in 0.2s") for s, d in flaky_states)
    assert flaky_states[-1][0] == "succeeded"


def test_replay_after_fixing_the_cause_yields_one_result_and_a_second_replay_adds_nothing(
    stack: LocalStack, clickhouse_store: Store
) -> None:
    client = SluiceClient(stack.settings)
    lost = [client.submit(f"misrouted {i}", model="retired-model", tenant="replay") for i in range(3)]
    garbage_free = client.submit("fine", tenant="replay")
    client.flush()
    listed = wait_until(
        lambda: sluice(stack, "dlq", "list", "--reason", "unknown_model", "--tenant", "replay"),
        lambda r: len(r) == 3,
        timeout=90,
        what="three unknown_model dead letters",
    )
    assert {r["request_id"] for r in listed} == set(lost)
    shown = sluice_show(stack, listed[0]["dead_letter_id"])
    assert shown["original_request"]["model"] == "retired-model"
    assert shown["reason"] == "unknown_model" and shown["stage"] == "processor"

    # The cause: the model is gone. The fix: replay onto a model that exists.
    first = sluice(stack, "dlq", "replay", "--reason", "unknown_model", "--tenant", "replay", "--to-model", "tiny")
    assert [o["action"] for o in first] == ["replayed"] * 3
    replay_ids = [o["request_id"] for o in first]
    rows = wait_until(
        lambda: results(clickhouse_store, replay_ids), lambda r: len(r) == 3, timeout=90, what="replayed results"
    )
    assert {r["replay_of"] for r in rows.values()} == set(lost)
    assert all(r["status"] == "succeeded" and r["model"] == "tiny" for r in rows.values())

    second = sluice(stack, "dlq", "replay", "--reason", "unknown_model", "--tenant", "replay", "--to-model", "tiny")
    assert [o["action"] for o in second] == ["skipped"] * 3
    assert all("already replayed" in o["detail"] for o in second)
    lineage = clickhouse_store.query(
        # Raw rows, no FINAL: a second replay must not have produced a second result at all.
        "SELECT replay_of, count() FROM sluice.results WHERE replay_of IN {ids:Array(String)} GROUP BY replay_of",
        {"ids": lost},
    ).rows
    assert sorted(lineage) == sorted([[rid, 1] for rid in lost])
    assert results(clickhouse_store, [garbage_free])[garbage_free]["status"] == "succeeded"


def sluice_show(stack: LocalStack, dead_letter_id: str) -> dict[str, Any]:
    proc = run_cli(stack.settings, "dlq", "show", dead_letter_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown: dict[str, Any] = json.loads(proc.stdout)
    return shown


def test_a_cancelled_request_that_has_not_started_is_skipped(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    # 256 tokens (the default max_tokens) at 2 ms: 0.5 s per request, 8 at a time.
    stack = make_stack(engine={"instant_token_seconds": 0.002})
    client = SluiceClient(stack.settings)
    ids = [client.submit(f"backlog {i}", priority="low", tenant="cancel", cache=False) for i in range(48)]
    client.flush()
    doomed = ids[-3:]
    for rid in doomed:
        client.cancel(rid, "no longer needed")
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, ids), lambda r: len(r) == len(ids), timeout=120, what="every result"
    )
    for rid in doomed:
        assert rows[rid]["status"] == "failed" and rows[rid]["error"] == "cancelled: no longer needed"
        assert wait_until(lambda rid=rid: statuses(clickhouse_store, rid), timeout=30)[-1][0] == "cancelled"
    assert all(rows[rid]["status"] == "succeeded" for rid in ids[:-3])
    cancelled = clickhouse_store.query(
        "SELECT count() FROM sluice.dead_letters WHERE reason = 'cancelled' AND request_id IN {ids:Array(String)}",
        {"ids": doomed},
    ).rows[0][0]
    assert cancelled == 3
