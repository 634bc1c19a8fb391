from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas import ChatMessage, DeadLetter, InferenceRequest, Serde
from sluice.catalog import Catalog, ModelEntry
from sluice.errors import DeadLetterReason, PipelineRejection
from sluice.topics import Topics
from stream_processors.pipeline import RequestPipeline
from stream_processors.router import Router

CHEAP = ModelEntry(
    name="cheap",
    source="x",
    tier=1,
    context_length=1000,
    input_price_per_1m=0.1,
    output_price_per_1m=0.2,
)
BIG = ModelEntry(
    name="big",
    source="x",
    tier=3,
    context_length=32000,
    input_price_per_1m=1,
    output_price_per_1m=2,
)
OFF = ModelEntry(
    name="off",
    source="x",
    tier=1,
    context_length=64000,
    input_price_per_1m=0.01,
    output_price_per_1m=0.01,
    available=False,
)
CATALOG = Catalog(models=[BIG, CHEAP, OFF])


def req(content: str = "hello", **kw: object) -> InferenceRequest:
    return InferenceRequest.model_validate({"messages": [ChatMessage(role="user", content=content)], **kw})


@pytest.mark.parametrize(
    ("request_", "model", "reason_part"),
    [
        (req(), "cheap", "cheapest"),
        (req(max_tokens=900), "cheap", "cheapest"),
        (req(max_tokens=1200), "big", "context >= 1202"),
        (req("x" * 8000), "big", "cheapest"),
        (req(model="big"), "big", "explicit"),
    ],
)
def test_router_decisions(request_: InferenceRequest, model: str, reason_part: str) -> None:
    route = Router(CATALOG).route(request_)
    assert route.model == model and reason_part in route.reason


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (req(model="nope"), DeadLetterReason.UNKNOWN_MODEL),
        (req(model="cheap", max_tokens=2000), DeadLetterReason.CONTEXT_OVERFLOW),
        (req("x" * 200_000), DeadLetterReason.CONTEXT_OVERFLOW),
    ],
)
def test_router_rejections(request_: InferenceRequest, reason: DeadLetterReason) -> None:
    with pytest.raises(PipelineRejection) as err:
        Router(CATALOG).route(request_)
    assert err.value.reason is reason


def _pipeline() -> tuple[RequestPipeline, Serde, Topics]:
    serde, topics = Serde(), Topics("p.")
    return RequestPipeline(CATALOG, topics, serde), serde, topics


def test_pipeline_routes_to_the_model_and_priority_topic() -> None:
    pipe, serde, topics = _pipeline()
    r = req(priority="low")
    fwd = pipe.process(serde.encode(r), topic=topics.requests("low"), partition=0, offset=5)
    assert fwd.topic == "p.model.cheap.low" and fwd.key == r.request_id.encode()
    routed = serde.decode(InferenceRequest, fwd.value)
    assert routed.route is not None and routed.route.model == "cheap"
    assert routed.model_copy(update={"route": None}) == r


@pytest.mark.parametrize(
    ("value", "topic_priority", "reason"),
    [
        (b"nope", "normal", DeadLetterReason.MALFORMED_EVENT),
        (None, "normal", DeadLetterReason.MALFORMED_EVENT),
        ("high-on-low", "low", DeadLetterReason.VALIDATION_ERROR),
        ("expired", "normal", DeadLetterReason.DEADLINE_EXPIRED),
        ("unknown-model", "normal", DeadLetterReason.UNKNOWN_MODEL),
    ],
)
def test_pipeline_dead_letters_never_raise(value: object, topic_priority: str, reason: DeadLetterReason) -> None:
    pipe, serde, topics = _pipeline()
    if value == "high-on-low":
        value = serde.encode(req(priority="high"))
    elif value == "expired":
        value = serde.encode(req(deadline=datetime.now(UTC) - timedelta(seconds=1)))
    elif value == "unknown-model":
        value = serde.encode(req(model="gpt-x"))
    fwd = pipe.process(value, topic=topics.requests(topic_priority), partition=2, offset=9)  # type: ignore[arg-type]
    assert fwd.topic == topics.dead_letter
    dl = serde.decode(DeadLetter, fwd.value)
    assert dl.reason is reason and dl.source_partition == 2 and dl.source_offset == 9
    assert dl.original == (value or b"")
    # Deterministic id: a redelivered poison event maps to the same dead-letter row.
    again = pipe.process(value, topic=topics.requests(topic_priority), partition=2, offset=9)  # type: ignore[arg-type]
    assert serde.decode(DeadLetter, again.value).dead_letter_id == dl.dead_letter_id
