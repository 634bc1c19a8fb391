"""OpenAI's documented batch flow, unchanged, through the official ``openai`` package pointed at the
gateway of an embedded stack running the real engine (vLLM, tiny model)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from analytics.store import Store
from core.catalog import Catalog, ModelEntry
from core.settings import Settings
from gateway.keys import KeyStore, keys_path
from sluice.local.stack import LocalStack
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.engine, pytest.mark.slow]

ANSWER = {
    "type": "object",
    # Bounded values: a random-weight model writes digits of an unbounded integer until max_tokens.
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


@pytest.fixture
def catalog(tiny_model_dir: Path, make_entry: Callable[..., ModelEntry]) -> Catalog:
    return Catalog(models=[make_entry("tiny", source=str(tiny_model_dir), context_length=512)])


@pytest.fixture
def gateway_stack(settings: Settings, clickhouse_store: Store) -> Iterator[LocalStack]:
    settings = settings.evolve(engine={"kind": "vllm", "max_inflight": None})
    stack = LocalStack(settings, store=clickhouse_store, run_gateway=True).start()
    yield stack
    stack.stop()


def _line(custom_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_openai_batch_flow_gives_one_line_per_input_line(gateway_stack: LocalStack, tmp_path: Path) -> None:
    assert gateway_stack.gateway_url is not None
    key = KeyStore(keys_path(gateway_stack.settings)).create("team-a")
    hi = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    lines = [
        _line("ok-1", hi),
        '{"custom_id": "broken", "method": "POST", "url": ',  # malformed JSON
        _line("unknown-model", {**hi, "model": "gpt-imaginary"}),
        _line("too-long", {**hi, "messages": [{"role": "user", "content": "zq " * 700}], "max_tokens": 100}),
        _line(
            "json",
            {
                "model": "auto",
                "messages": [
                    {"role": "system", "content": "Answer in JSON."},
                    {"role": "user", "content": "Is the sky blue?"},
                ],
                "max_completion_tokens": 40,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}},
            },
        ),
        _line("ok-1-again", hi),  # the same request under another id: deduplicated, still answered
        _line("ok-1", {**hi, "max_tokens": 4}),  # a custom_id used twice
        _line("unknown-field", {**hi, "logprobs": True}),
        _line("n-2", {**hi, "n": 2}),
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")

    client = OpenAI(base_url=f"{gateway_stack.gateway_url}/v1", api_key=key, max_retries=0)
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_until(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
        timeout=240,
        interval=1.0,
        what="the batch to end",
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (9, 3, 6)
    assert batch.output_file_id and batch.error_file_id

    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(out) + len(err) == len(lines)
    assert sorted(o["custom_id"] for o in out) == ["json", "ok-1", "ok-1-again"]
    errors = {e["custom_id"]: e["error"] for e in err}
    assert set(errors) == {None, "unknown-model", "too-long", "ok-1", "unknown-field", "n-2"}
    assert errors["unknown-model"]["code"] == "model_not_found"
    assert errors["too-long"]["code"] == "context_length_exceeded"
    assert "duplicate custom_id" in errors["ok-1"]["message"]
    assert "logprobs" in errors["unknown-field"]["message"]
    assert "n must be 1" in errors["n-2"]["message"]
    assert "not a JSON object" in errors[None]["message"]

    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] > 0
    choice = next(o for o in out if o["custom_id"] == "json")["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), ANSWER)

    # The batch, its files and its output are the tenant's own.
    other = OpenAI(
        base_url=f"{gateway_stack.gateway_url}/v1",
        api_key=KeyStore(keys_path(gateway_stack.settings)).create("team-b"),
        max_retries=0,
    )
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert list(other.batches.list()) == []


def test_responses_create_with_a_json_schema_format_on_the_real_engine(gateway_stack: LocalStack) -> None:
    """The Responses API, synchronous at the flex tier: vLLM's structured outputs hold the schema."""
    assert gateway_stack.gateway_url is not None
    key = KeyStore(keys_path(gateway_stack.settings)).create("team-r")
    client = OpenAI(base_url=f"{gateway_stack.gateway_url}/v1", api_key=key, max_retries=0)
    response = client.responses.create(
        model="tiny",
        instructions="Answer in JSON.",
        input="Is the sky blue?",
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}},
        service_tier="flex",
    )
    assert response.status == "completed" and response.model == "tiny" and response.service_tier == "flex"
    assert response.usage is not None and response.usage.output_tokens > 0
    jsonschema.validate(json.loads(response.output_text), ANSWER)
