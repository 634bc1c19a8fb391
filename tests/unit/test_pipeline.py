from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.catalog import Catalog
from core.errors import DeadLetterReason
from core.settings import ProcessorSettings
from core.topics import Topics
from schemas import ChatMessage, DeadLetter, InferenceRequest, InferenceResult, RequestStatus, Serde
from stream_processors.pipeline import RequestPipeline
from tests.avro_frames import frame_request_dict
from tests.support import model_entry

CHEAP = model_entry("cheap", tier=1, context_length=1000, input_price_per_1m=0.1, output_price_per_1m=0.2)
BIG = model_entry("big", tier=3, context_length=32000, input_price_per_1m=1, output_price_per_1m=2)
OFF = model_entry(
    "off", tier=1, context_length=64000, input_price_per_1m=0.01, output_price_per_1m=0.01, available=False
)
CATALOG = Catalog(models=[BIG, CHEAP, OFF])


def req(content: str = "hello", **kw: object) -> InferenceRequest:
    return InferenceRequest.model_validate({"messages": [ChatMessage(role="user", content=content)], **kw})


def _pipeline(**settings: object) -> tuple[RequestPipeline, Serde, Topics]:
    serde, topics = Serde(), Topics("p.")
    return RequestPipeline(CATALOG, topics, serde, ProcessorSettings.model_validate(settings)), serde, topics


def test_pipeline_routes_an_uncached_request_straight_to_the_model_and_priority_topic() -> None:
    pipe, serde, topics = _pipeline()
    r = req(priority="low", cache=False)
    fwds = pipe.process(serde.encode(r), topic=topics.requests("low"), partition=0, offset=5)
    assert [f.topic for f in fwds] == ["p.model.cheap.low", topics.status]
    fwd = fwds[0]
    assert fwd.key_bytes() == r.request_id.encode()
    routed = serde.decode(InferenceRequest, fwd.value(serde))
    assert routed.route is not None and routed.route.model == "cheap"
    assert routed.model_copy(update={"route": None}) == r
    status = serde.decode(RequestStatus, fwds[1].value(serde))
    assert (status.request_id, status.state, status.model) == (r.request_id, "routed", "cheap")
    assert pipe.router.backlog.get("cheap") == 1


def test_pipeline_repartitions_dedupable_requests_by_their_key() -> None:
    pipe, serde, topics = _pipeline()
    a, b = req("same question"), req("same question")
    fa = pipe.process(serde.encode(a), topic=topics.requests("normal"), partition=0, offset=1)
    fb = pipe.process(serde.encode(b), topic=topics.requests("normal"), partition=1, offset=1)
    assert [f.topic for f in fa] == [topics.dedupe] and fa[0].headers == [("kind", b"request")]
    assert fa[0].key == fb[0].key and fa[0].key is not None and fa[0].key.startswith(b"content:default:")
    assert serde.decode(InferenceRequest, fa[0].value(serde)).dedupe_key == fa[0].key.decode()
    # Idempotency keys are scoped by tenant; another tenant's same content is another key.
    keyed = pipe.process(
        serde.encode(req(idempotency_key="k1")), topic=topics.requests("normal"), partition=0, offset=2
    )
    other = pipe.process(
        serde.encode(req("same question", tenant="t2")), topic=topics.requests("normal"), partition=0, offset=3
    )
    assert keyed[0].key == b"idem:default:k1"
    assert other[0].key != fa[0].key


def test_pipeline_flags_a_request_close_to_its_deadline() -> None:
    pipe, serde, topics = _pipeline(deadline_warning_s=60)
    r = req(cache=False, deadline=datetime.now(UTC) + timedelta(seconds=20))
    fwds = pipe.process(serde.encode(r), topic=topics.requests("normal"), partition=0, offset=1)
    flagged = serde.decode(RequestStatus, fwds[0].value(serde))
    assert flagged.state == "queued" and flagged.detail is not None and "near deadline" in flagged.detail


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
    fwds = pipe.process(value, topic=topics.requests(topic_priority), partition=2, offset=9)  # type: ignore[arg-type]
    fwd = fwds[0]
    assert fwd.topic == topics.dead_letter
    dl = serde.decode(DeadLetter, fwd.value(serde))
    assert dl.reason is reason and dl.source_partition == 2 and dl.source_offset == 9
    assert dl.original == (value or b"")
    # Deterministic id: a redelivered poison event maps to the same dead-letter row.
    again = pipe.process(value, topic=topics.requests(topic_priority), partition=2, offset=9)  # type: ignore[arg-type]
    assert serde.decode(DeadLetter, again[0].value(serde)).dead_letter_id == dl.dead_letter_id
    if dl.request_id is not None:
        # A decodable request also gets a failed result, so its submitter is not left waiting.
        result = serde.decode(InferenceResult, fwds[1].value(serde))
        assert result.status == "failed" and reason.value in (result.error or "")
        assert result.request_id == dl.request_id


_text = st.text(max_size=40)
_records = st.fixed_dictionaries(
    {
        "request_id": _text,
        "tenant": _text,
        "priority": st.sampled_from(["high", "normal", "low", "", "urgent"]) | _text,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": st.text(max_size=300)}
            ),
            max_size=4,
        ),
        "model": st.none() | st.sampled_from(["cheap", "big", "off", "nope"]),
        "max_tokens": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "temperature": st.floats(allow_nan=True, allow_infinity=True),
        "top_p": st.floats(allow_nan=True, allow_infinity=True),
        "seed": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "created_at": st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ),
        "deadline": st.none()
        | st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
        "idempotency_key": st.none() | _text,
        "cache": st.booleans(),
        "attempt": st.integers(min_value=-5, max_value=5),
        "metadata": st.dictionaries(st.sampled_from(["tier", "task_type", "x"]), _text, max_size=3),
    }
)


@settings(max_examples=300, deadline=None)
@given(_records, st.sampled_from(["high", "normal", "low"]))
def test_fuzz_random_field_values_route_or_dead_letter_never_raise(
    record: dict[str, object], topic_priority: str
) -> None:
    """Structurally valid Avro with arbitrary values: every event becomes a route or a typed dead letter."""
    pipe, serde, topics = _pipeline()
    value = frame_request_dict(record)
    fwds = pipe.process(value, topic=topics.requests(topic_priority), partition=0, offset=1)
    first = fwds[0]
    if first.topic == topics.dead_letter:
        dl = serde.decode(DeadLetter, first.value(serde))
        assert isinstance(dl.reason, DeadLetterReason) and dl.original == value and dl.error
    else:
        assert first.topic == topics.dedupe or first.topic.startswith("p.model.")
        routed = serde.decode(InferenceRequest, first.value(serde))
        assert routed.route is not None and routed.priority == topic_priority


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("messages", [{"role": "user", "content": "   "}], "all messages are empty"),
        ("max_tokens", -5, "max_tokens"),
        ("priority", "urgent", "priority"),
    ],
)
def test_a_readable_but_invalid_request_keeps_its_requester(field: str, value: object, why: str) -> None:
    pipe, serde, topics = _pipeline()
    record = req(request_id="r-invalid", tenant="acme", correlation_id="c-1").to_avro()
    record[field] = value
    fwds = pipe.process(frame_request_dict(record), topic=topics.requests("low"), partition=0, offset=3)
    dl = serde.decode(DeadLetter, fwds[0].value(serde))
    assert dl.reason is DeadLetterReason.VALIDATION_ERROR and why in dl.error
    assert (dl.request_id, dl.tenant) == ("r-invalid", "acme")
    result = serde.decode(InferenceResult, fwds[1].value(serde))
    assert (result.request_id, result.tenant, result.status) == ("r-invalid", "acme", "failed")
    assert result.correlation_id == "c-1" and result.error is not None and result.error.startswith("validation_error")
    # An invalid priority cannot be echoed back: the result carries the topic's.
    assert result.priority == ("low" if field == "priority" else record["priority"])


def test_dead_letter_ids_repeat_for_the_same_message_and_differ_across_broker_lifetimes() -> None:
    pipe, serde, topics = _pipeline()
    value = serde.encode(req(model="gpt-x"))
    topic = topics.requests("normal")

    def dl_id(**kw: object) -> str:
        fwds = pipe.process(kw.pop("value", value), topic=topic, partition=0, offset=0, **kw)  # type: ignore[arg-type]
        return serde.decode(DeadLetter, fwds[0].value(serde)).dead_letter_id

    first = dl_id(timestamp_ms=1_700_000_000_000)
    assert dl_id(timestamp_ms=1_700_000_000_000) == first  # redelivered: the same row
    # A new broker numbers offsets from 0 again: same coordinates, another message.
    assert dl_id(timestamp_ms=1_700_000_999_000) != first
    assert dl_id(timestamp_ms=1_700_000_000_000, value=serde.encode(req(model="gpt-y"))) != first
