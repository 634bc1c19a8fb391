"""The real engine path: vLLM (CPU here, GPU where available) with a tiny model built locally."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from analytics.store import Store
from core.catalog import Catalog, ModelEntry
from core.settings import Settings
from producers import SluiceClient
from schemas import utcnow
from sluice.local.stack import LocalStack
from tests.integration.helpers import dead_letters, result_counts
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.engine, pytest.mark.slow]


@pytest.fixture
def catalog(tiny_model_dir: Path, make_entry: Callable[..., ModelEntry]) -> Catalog:
    return Catalog(models=[make_entry("tiny", source=str(tiny_model_dir), context_length=512)])


@pytest.fixture
def vllm_stack(settings: Settings, clickhouse_store: Store) -> Iterator[LocalStack]:
    # the engine's own max_num_seqs, as deployed
    settings = settings.evolve(engine={"kind": "vllm", "max_inflight": None})
    stack = LocalStack(settings, store=clickhouse_store).start()
    yield stack
    stack.stop()


def test_requests_run_through_real_vllm_end_to_end(vllm_stack: LocalStack, clickhouse_store: Store) -> None:
    settings = vllm_stack.settings
    client = SluiceClient(settings)
    ids = [
        client.submit(f"Tell me about topic {i}.", priority=("high", "normal", "low")[i % 3], max_tokens=12)
        for i in range(10)
    ]
    # Fits the router's estimate but not the real tokenizer's count: a per-request engine error.
    overflow = client.submit("zq" * 700, max_tokens=100, model="tiny")
    client.flush()

    def progress() -> dict[str, int]:
        vllm_stack.check()  # fail fast, with the consumer's log, if the engine died
        return result_counts(clickhouse_store, [*ids, overflow])

    counts = wait_until(progress, lambda c: len(c) == 11, timeout=300, interval=1, what="vLLM results")
    assert counts == {rid: 1 for rid in [*ids, overflow]}
    rows = clickhouse_store.query(
        "SELECT request_id, status, prompt_tokens, completion_tokens, finish_reason, output_text, error "
        "FROM sluice.results FINAL WHERE request_id IN {ids:Array(String)}",
        {"ids": [*ids, overflow]},
    ).dicts()
    by_id = {r["request_id"]: r for r in rows}
    for rid in ids:
        r = by_id[rid]
        assert r["status"] == "succeeded", r
        # Real tokenization and generation: the tiny model's random weights never emit EOS
        # reliably, so a request stops at max_tokens or on EOS, never beyond.
        assert r["prompt_tokens"] > 5 and 0 < r["completion_tokens"] <= 12
        assert r["finish_reason"] in ("length", "stop") and r["output_text"]
    assert by_id[overflow]["status"] == "failed" and "context_overflow" in by_id[overflow]["error"]
    dls = wait_until(
        lambda: dead_letters(clickhouse_store, settings.topic_prefix),
        lambda d: len(d) >= 1,
        timeout=60,
    )
    assert [(d["reason"], d["request_id"]) for d in dls] == [("context_overflow", overflow)]
    # vLLM's own series come out of the consumer's /metrics next to Sluice's.
    text = httpx.get(vllm_stack.metrics_urls["gpu-tiny"], timeout=10).text
    samples = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels.get("le")
    }
    assert samples.get("vllm:generation_tokens_total", 0) > 0
    assert samples.get("sluice_tokens_total", 0) > 0


def test_the_engine_loop_on_real_vllm_mixed_lengths_cancel_and_deadline(
    vllm_stack: LocalStack, clickhouse_store: Store
) -> None:
    """Short requests finish before long ones submitted with them; a running request is aborted
    on cancellation and on its deadline, and billed for the tokens it used."""
    settings = vllm_stack.settings
    client = SluiceClient(settings)
    warm = client.submit("warm up", max_tokens=2, cache=False)
    client.flush()
    wait_until(lambda: result_counts(clickhouse_store, [warm]), timeout=300, interval=1, what="engine up")

    long = [client.submit(f"long story {i}", max_tokens=400, cache=False, priority="low") for i in range(3)]
    short = [client.submit(f"short answer {i}", max_tokens=4, cache=False, priority="low") for i in range(6)]
    doomed = client.submit("a very long essay that nobody will read", max_tokens=450, cache=False)
    late = client.submit(
        "another very long essay, with a deadline",
        max_tokens=450,
        cache=False,
        deadline=utcnow() + timedelta(seconds=1.5),
    )
    client.flush()
    time.sleep(0.8)  # the engine has started both
    client.cancel(doomed, "no longer needed")
    client.flush()
    everything = [*long, *short, doomed, late]
    wait_until(
        lambda: result_counts(clickhouse_store, everything),
        lambda c: len(c) == len(everything),
        timeout=300,
        interval=1,
        what="every result",
    )
    rows = {
        r["request_id"]: r
        for r in clickhouse_store.query(
            "SELECT request_id, status, error, completion_tokens, completed_at FROM sluice.results FINAL "
            "WHERE request_id IN {ids:Array(String)}",
            {"ids": everything},
        ).dicts()
    }
    assert max(rows[s]["completed_at"] for s in short) < min(rows[lg]["completed_at"] for lg in long)
    assert all(rows[rid]["status"] == "succeeded" for rid in [*long, *short])
    assert rows[doomed]["error"] == "cancelled: no longer needed"
    assert rows[late]["error"].startswith("deadline_expired: ") and "while it ran" in rows[late]["error"]
    metrics = wait_until(
        lambda: (
            clickhouse_store.query(
                "SELECT request_id, output_tokens, cost_usd FROM sluice.cost_metrics FINAL "
                "WHERE request_id IN {ids:Array(String)}",
                {"ids": [doomed, late]},
            ).rows
        ),
        lambda r: len(r) == 2,
        timeout=60,
    )
    for _rid, output_tokens, cost in metrics:
        assert 0 < output_tokens < 450 and cost > 0
