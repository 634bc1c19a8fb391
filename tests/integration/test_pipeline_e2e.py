"""End to end on the real broker and ClickHouse, with the named instant test engine.

The real-engine version of this journey is in test_vllm_engine.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from analytics.store import Store
from gpu_consumers.instant_engine import POISON_PILL
from producers import SluiceClient
from schemas import CostMetric, InferenceResult, Serde
from sluice.local.stack import LocalStack
from tests.avro_frames import frame_request_dict
from tests.integration.helpers import dead_letters, produce_raw, result_counts
from tests.support import cli_json, run_cli, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def test_every_request_gets_exactly_one_result_row_and_bad_events_dead_letter(
    stack: LocalStack, clickhouse_store: Store, serde: Serde
) -> None:
    settings = stack.settings
    client = SluiceClient(settings)
    priorities = ["high", "normal", "low"]
    ids = [
        client.submit(
            f"request number {i} about kafka",
            priority=priorities[i % 3],
            tenant="e2e",
            max_tokens=16,
        )
        for i in range(24)
    ]
    poison = client.submit(f"this one is a {POISON_PILL}", tenant="e2e")
    unknown = client.submit("route me nowhere", model="no-such-model", tenant="e2e")
    client.flush()
    produce_raw(settings, stack.topics.requests("normal"), [b"\x07not avro at all"])

    counts = wait_until(
        lambda: result_counts(clickhouse_store, [*ids, poison]),
        lambda c: len(c) == 25,
        timeout=120,
        what="a result row for every valid request",
    )
    assert counts == {rid: 1 for rid in [*ids, poison]}

    rows = clickhouse_store.query(
        "SELECT request_id, status, model, tenant, completion_tokens, error FROM sluice.results FINAL "
        "WHERE request_id IN {ids:Array(String)}",
        {"ids": [*ids, poison]},
    ).dicts()
    by_id = {r["request_id"]: r for r in rows}
    # Poison-pill isolation: only the poisoned request failed; its batch neighbours succeeded.
    assert by_id[poison]["status"] == "failed" and "engine_error" in by_id[poison]["error"]
    assert all(by_id[i]["status"] == "succeeded" and by_id[i]["completion_tokens"] > 0 for i in ids)
    # Simple requests route to the cheapest model with enough context.
    assert {by_id[i]["model"] for i in ids} == {"tiny"}

    dls = wait_until(
        lambda: dead_letters(clickhouse_store, settings.topic_prefix),
        lambda d: len(d) >= 3,
        timeout=60,
        what="three dead letters",
    )
    reasons = {(d["reason"], d["request_id"]) for d in dls}
    assert ("malformed_event", None) in reasons
    assert ("unknown_model", unknown) in reasons
    # The poison pill was retried (through the retry topics) until its attempts ran out.
    assert ("retries_exhausted", poison) in reasons
    malformed = next(d for d in dls if d["reason"] == "malformed_event")
    assert malformed["source_topic"] == stack.topics.requests("normal")
    assert malformed["stage"] == "processor"

    metrics = clickhouse_store.query(
        "SELECT count(), sum(cost_usd) > 0, countIf(baseline_cost_usd >= cost_usd) FROM sluice.cost_metrics FINAL "
        "WHERE request_id IN {ids:Array(String)}",
        {"ids": ids},
    ).rows[0]
    assert metrics[0] == len(ids) and metrics[1] and metrics[2] == len(ids)


def test_results_topic_carries_avro_results_and_metrics(stack: LocalStack, serde: Serde) -> None:

    from core import clients

    settings = stack.settings
    client = SluiceClient(settings)
    rid = client.submit("hello there", priority="high", correlation_id="corr-1", tenant="acme")
    client.flush()
    consumer = clients.consumer(settings.kafka, "test", f"{settings.topic_prefix}check")
    consumer.subscribe([stack.topics.results, stack.topics.cost_metrics])
    seen: dict[str, object] = {}

    def poll() -> bool:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            rtype = InferenceResult if msg.topic() == stack.topics.results else CostMetric
            rec = serde.decode(rtype, msg.value())
            assert msg.key() == rid.encode()
            seen[msg.topic()] = rec
        return len(seen) == 2

    wait_until(poll, timeout=90, interval=0, what="result and cost metric")
    consumer.close()
    result = seen[stack.topics.results]
    assert isinstance(result, InferenceResult)
    assert (result.request_id, result.tenant, result.priority, result.correlation_id) == (
        rid,
        "acme",
        "high",
        "corr-1",
    )
    assert result.completed_at >= result.started_at >= result.created_at


def test_bad_input_kinds_become_typed_dead_letters_while_good_traffic_flows(
    stack: LocalStack, clickhouse_store: Store, serde: Serde
) -> None:
    settings = stack.settings
    normal = stack.topics.requests("normal")
    base = {
        "request_id": "x",
        "tenant": "t",
        "priority": "normal",
        "messages": [{"role": "user", "content": "hi"}],
        "created_at": datetime.now(UTC),
    }
    cases = {
        "wrong magic byte": (b"\x01\x00\x00\x00\x01abc", "malformed_event"),
        "too short": (b"\x00\x00", "malformed_event"),
        "unknown schema id": (b"\x00\x00\x00\x7f\x7fabc", "schema_mismatch"),
        "result on request topic": (
            serde.encode(
                InferenceResult(
                    request_id="r",
                    tenant="t",
                    priority="normal",
                    model="m",
                    status="succeeded",
                    created_at=datetime.now(UTC),
                    started_at=datetime.now(UTC),
                    completed_at=datetime.now(UTC),
                )
            ),
            "schema_mismatch",
        ),
        "truncated body": (frame_request_dict(base)[:-3], "malformed_event"),
        "negative max_tokens": (frame_request_dict({**base, "max_tokens": -5}), "validation_error"),
        "empty prompt": (
            frame_request_dict({**base, "messages": [{"role": "user", "content": "  "}]}),
            "validation_error",
        ),
        "unknown role": (
            frame_request_dict({**base, "messages": [{"role": "robot", "content": "x"}]}),
            "validation_error",
        ),
        "unknown priority": (
            frame_request_dict({**base, "priority": "urgent"}),
            "validation_error",
        ),
        "expired deadline": (
            frame_request_dict({**base, "deadline": datetime.now(UTC) - timedelta(seconds=5)}),
            "deadline_expired",
        ),
        "oversized prompt": (
            frame_request_dict({**base, "messages": [{"role": "user", "content": "x" * 300_000}]}),
            "validation_error",
        ),
        # Under the 200k-character prompt limit, but beyond every model's context.
        "context overflow": (
            frame_request_dict({**base, "messages": [{"role": "user", "content": "word " * 30_000}]}),
            "context_overflow",
        ),
    }
    produce_raw(settings, normal, [v for v, _ in cases.values()])
    client = SluiceClient(settings)
    good = [client.submit(f"good {i}", tenant="bad-input") for i in range(5)]
    client.flush()

    wait_until(lambda: len(result_counts(clickhouse_store, good)) == 5, timeout=90, what="good results")
    dls = wait_until(
        lambda: dead_letters(clickhouse_store, settings.topic_prefix),
        lambda d: len(d) >= len(cases),
        timeout=60,
        what="one dead letter per bad event",
    )
    # Each dead letter carries the original bytes (for inspection and replay) and its reason.
    got = {d["original_hex"]: d["reason"] for d in dls}
    assert got == {value.hex(): reason for value, reason in cases.values()}


def test_sql_and_stats_from_another_process_while_the_stack_runs(stack: LocalStack, clickhouse_store: Store) -> None:
    settings = stack.settings
    client = SluiceClient(settings)
    ids = [client.submit(f"stats {i}", priority="low", tenant="stats-tenant") for i in range(3)]
    client.flush()
    wait_until(lambda: len(result_counts(clickhouse_store, ids)) == 3, timeout=90, what="results")
    if clickhouse_store.embedded:
        # The stack's process owns the chDB directory; the CLI must go through its query endpoint.
        assert (settings.data_dir / "stack.json").is_file()
    out = cli_json(settings, "sql", "SELECT count() AS n FROM sluice.results FINAL WHERE tenant = 'stats-tenant'")
    assert out == [{"n": 3}]
    rows = wait_until(
        lambda: cli_json(settings, "stats", "--view", "latency", "--tenant", "stats-tenant"),
        lambda rows: sum(r["requests"] for r in rows) == 3,
        timeout=60,
        what="the hourly rollup to hold the 3 results",
    )
    assert [(r["model"], r["priority"], r["requests"]) for r in rows] == [("tiny", "low", 3)]
    # --plot: the charts of the same rollup, one self-contained HTML file.
    report = settings.data_dir / "report.html"
    proc = run_cli(settings, "stats", "--tenant", "stats-tenant", "--plot", str(report))
    assert proc.returncode == 0, proc.stderr
    html = report.read_text()
    assert html.count("<svg") == 3 and "tiny / low" in html and "<script" not in html
    assert rows[0]["p95_ms"] >= rows[0]["p50_ms"] > 0


def test_stats_right_after_the_last_result_include_it(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    # A rollup refreshed once at start and then not for an hour: stats must still be current.
    stack = make_stack(clickhouse={"rollup_interval_s": 3600.0})
    settings = stack.settings
    with SluiceClient(settings) as client:
        ids = [client.submit(f"fresh stats {i}", tenant="fresh-tenant", cache=False) for i in range(4)]
    wait_until(lambda: len(result_counts(clickhouse_store, ids)) == 4, timeout=90, what="results")
    proc = run_cli(settings, "stats", "--view", "latency", "--tenant", "fresh-tenant", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sum(r["requests"] for r in rows) == 4  # at once: no waiting for the rollup
    (stated,) = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"complete_up_to"')]
    assert set(stated) == {"complete_up_to", "rollup_refreshed_at"}
    table = run_cli(settings, "stats", "--tenant", "fresh-tenant")
    assert "complete up to" in table.stdout
