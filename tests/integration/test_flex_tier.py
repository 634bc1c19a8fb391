"""The synchronous tier through the official ``openai`` package, unchanged, ``base_url`` at the
gateway of an embedded stack (instant engine: a test double with a per-token time):
``chat.completions.create`` at flex and default, streamed, ``models.list``, a batch of
``/v1/responses`` lines, 50 concurrent async calls, 429 on a saturated queue with nothing queued,
and a caller's timeout that ends as ``cancelled`` with its tokens billed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from analytics.store import Store
from core.settings import Settings
from core.topics import Topics
from gateway.keys import KeyStore, keys_path
from producers import SluiceClient
from schemas import InferenceRequest, Serde
from sluice.local.stack import LocalStack
from tests.integration.helpers import results, topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def flex_stack(settings: Settings, clickhouse_store: Store) -> Iterator[Callable[..., LocalStack]]:
    started: list[LocalStack] = []

    def make(**changes: Any) -> LocalStack:
        stack = LocalStack(settings.evolve(**changes), store=clickhouse_store, run_gateway=True).start()
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.stop()


def client_for(stack: LocalStack, tenant: str, **kw: Any) -> OpenAI:
    key = KeyStore(keys_path(stack.settings)).create(tenant)
    return OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0, **kw)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_completions_flex_default_streamed_and_models(
    flex_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = flex_stack(engine={"instant_token_seconds": 0.005})
    client = client_for(stack, "flex-a")

    assert [m.id for m in client.models.list()] == ["auto", "tiny", "big"]

    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=ask("summarise the flex tier"),
        service_tier="flex",
        max_tokens=6,  # type: ignore[arg-type]
    )
    flex = raw.parse()
    flex_id = raw.headers["x-request-id"]
    assert flex.object == "chat.completion" and flex.id == f"chatcmpl-{flex_id}"
    assert flex.service_tier == "flex" and flex.model == "tiny"
    assert flex.choices[0].message.content == "echo: summarise the flex tier summarise the"
    assert flex.usage is not None and flex.usage.completion_tokens == 6

    default = client.chat.completions.create(model="big", messages=ask("and the default one"), max_tokens=4)
    assert default.service_tier == "default" and default.model == "big"

    # Streamed: the chunks put together are the answer the same request gets unstreamed.
    prompt = ask("stream this answer please")
    stream = client.chat.completions.create(
        model="tiny", messages=prompt, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    whole = client.chat.completions.create(model="tiny", messages=prompt, max_tokens=5)
    assert streamed == whole.choices[0].message.content == "echo: stream this answer please stream"

    # Flex ran at low priority, the default tier at normal, through the whole pipeline.
    rows = wait_until(
        lambda: results(clickhouse_store, [flex_id]),
        lambda r: flex_id in r,
        timeout=30,
        what="the flex result in ClickHouse",
    )
    assert rows[flex_id]["priority"] == "low" and rows[flex_id]["tenant"] == "flex-a"


def test_fifty_concurrent_async_flex_calls_are_answered_and_batched_together(
    flex_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = flex_stack(engine={"instant_token_seconds": 0.02})
    key = KeyStore(keys_path(stack.settings)).create("flex-b")

    async def run() -> list[tuple[str, str]]:
        async with AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0) as client:

            async def one(i: int) -> tuple[str, str]:
                raw = await client.chat.completions.with_raw_response.create(
                    model="tiny", messages=ask(f"question number {i}"), max_tokens=20, service_tier="flex"
                )
                completion = raw.parse()
                return raw.headers["x-request-id"], completion.choices[0].message.content or ""

            return await asyncio.gather(*(one(i) for i in range(50)))

    answers = asyncio.run(run())
    assert len(answers) == 50 and all(text.startswith("echo: question number") for _, text in answers)
    ids = [rid for rid, _ in answers]
    rows = wait_until(
        lambda: results(clickhouse_store, ids), lambda r: len(r) == 50, timeout=60, what="50 results in ClickHouse"
    )
    # Continuous batching: the engine ran many of them at once (their engine runs overlap).
    spans = sorted((r["started_at"], r["completed_at"]) for r in rows.values())
    most = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most >= 4, f"at most {most} ran at once"


def _gauge(url: str, name: str, priority: str) -> float | None:
    text = httpx.get(url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("priority") == priority:
                return float(sample.value)
    return None


def test_a_saturated_queue_answers_429_at_once_and_queues_nothing(
    flex_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    # 8 at a time, 2 s each: a backlog of 120 low requests is about 30 s of work.
    stack = flex_stack(engine={"instant_token_seconds": 0.05})
    client = client_for(stack, "flex-c")
    with SluiceClient(stack.settings) as sdk:
        backlog = [
            sdk.submit(f"backlog item {i}", model="tiny", priority="low", max_tokens=40, tenant="bulk")
            for i in range(120)
        ]
        sdk.flush()
    metrics = stack.metrics_urls["gateway"]
    wait = wait_until(
        lambda: _gauge(metrics, "sluice_gateway_estimated_wait_seconds", "low"),
        lambda w: w is not None and w > 15,
        timeout=60,
        what="the gateway to estimate the low backlog's wait",
    )
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=ask("this can wait a little"),
            service_tier="flex",
            max_tokens=5,
            extra_headers={"X-Sluice-Max-Wait": "5"},
        )
    assert time.monotonic() - started < 3  # answered at once, not after the wait
    error = refused.value
    assert error.code == "resource_unavailable" and int(error.response.headers["retry-after"]) >= 1
    assert "estimated wait" in error.message and wait > 15
    # A priority call waits behind none of the low backlog: accepted and answered.
    urgent = client.chat.completions.create(model="tiny", messages=ask("urgent"), service_tier="priority", max_tokens=2)
    assert urgent.service_tier == "priority"
    # Nothing of the refused call was queued: the tenant's only request on any request topic is
    # the urgent one (counted on the topics, as a subscriber sees them).
    topics = Topics(stack.settings.topic_prefix)
    mine = [
        r.priority
        for t in topics.all_requests()
        for r in topic_records(stack.settings, t, InferenceRequest, Serde(), quiet_s=1.0)
        if r.tenant == "flex-c"
    ]
    assert mine == ["high"]
    assert len(backlog) == 120


def test_a_caller_that_times_out_cancels_its_request_and_is_billed_for_its_tokens(
    flex_stack: Callable[..., LocalStack], clickhouse_store: Store
) -> None:
    stack = flex_stack(engine={"instant_token_seconds": 0.05})
    client = client_for(stack, "flex-d", timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="tiny", messages=ask("a long answer"), max_tokens=400)  # 20 s of work
    rows = wait_until(
        lambda: store_rows(clickhouse_store, "flex-d"),
        lambda r: len(r) == 1,
        timeout=30,
        what="the cancelled request's result",
    )
    (row,) = rows
    assert row["status"] == "failed" and row["error"].startswith("cancelled"), row
    # Aborted while running: well short of its 400 tokens, and billed for what it used.
    assert 0 < row["completion_tokens"] < 400
    cost = wait_until(
        lambda: clickhouse_store.query(
            "SELECT sum(cost_usd) FROM sluice.cost_metrics FINAL WHERE request_id = {r:String}",
            {"r": row["request_id"]},
        ).rows[0][0],
        lambda c: c is not None and c > 0,
        timeout=30,
        what="the cancelled request's cost",
    )
    assert cost > 0


def store_rows(store: Store, tenant: str) -> list[dict[str, Any]]:
    return store.query(
        "SELECT request_id, status, error, completion_tokens FROM sluice.results FINAL WHERE tenant = {t:String}",
        {"t": tenant},
    ).dicts()


def test_a_batch_of_responses_lines_and_its_output_expiring(
    flex_stack: Callable[..., LocalStack], tmp_path: Path
) -> None:
    # Retention in seconds, not OpenAI's one-hour minimum, so the test sees files expire.
    stack = flex_stack(
        engine={"instant_token_seconds": 0.001}, gateway={"batch_poll_s": 0.3}, files={"min_expires_after_s": 1}
    )
    client = client_for(stack, "flex-e")
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"input": f"item {i}", "max_output_tokens": 3},
        }
        for i in range(3)
    ]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/responses", "body": {"input": "x", "tools": []}})
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.expires_at is None  # no retention set: kept until deleted
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/responses",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 4},
    )
    batch = wait_until(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
        timeout=120,
        interval=0.5,
        what="the batch to end",
    )
    assert batch.status == "completed" and batch.endpoint == "/v1/responses" and batch.output_file_id
    out = {o["custom_id"]: o for o in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    assert sorted(out) == ["r0", "r1", "r2"]
    body = out["r1"]["response"]["body"]
    assert body["object"] == "response" and body["status"] == "incomplete"  # stopped by max_output_tokens
    assert body["output"][0]["content"][0]["text"] == "echo: item 1 item"
    assert batch.error_file_id
    (err,) = map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
    assert err["custom_id"] == "bad" and "tools" in err["error"]["message"]

    # The output expires 4 s after it was written: then 404, and deleted from the store.
    output = client.files.retrieve(batch.output_file_id)
    assert output.expires_at is not None and output.expires_at - output.created_at == 4
    stored = stack.settings.data_dir / "files" / "data" / batch.output_file_id
    assert stored.exists()
    wait_until(lambda: not stored.exists(), lambda gone: gone, timeout=30, what="the expired output to be deleted")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.output_file_id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(batch.output_file_id)
    assert client.files.retrieve(uploaded.id).id == uploaded.id  # the input is kept
    # An upload with OpenAI's expires_after.
    short = client.files.create(
        file=path.open("rb"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert short.expires_at == short.created_at + 3600
