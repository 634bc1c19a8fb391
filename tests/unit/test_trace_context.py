"""W3C trace context, tenant and correlation id travel as headers through every hop: producer,
router (direct and dedupe paths, duplicates, cache hits, rejections), the retry delay, the GPU
consumer's results, retries and hand-backs."""

from __future__ import annotations

from typing import Any

import pytest

from core.catalog import Catalog
from core.errors import ConfigError
from core.headers import carried, header, valid_traceparent
from core.kafka.stub import StubBroker
from core.placement import dedupe_key
from core.settings import ProcessorSettings, RetrySettings, Settings
from core.topics import Topics
from gpu_consumers.buffer import Buffered
from gpu_consumers.engine import EngineOutput
from gpu_consumers.outcomes import Outcomes, Usage
from producers import SluiceClient
from schemas import ChatMessage, InferenceRequest, InferenceResult, ResultStatus, Route, Serde, utcnow
from stream_processors.dedupe import DedupeStage
from stream_processors.emit import Emitter
from stream_processors.pipeline import RequestPipeline
from tests.support import model_entry

CHEAP = model_entry("cheap", tier=1, context_length=1000, input_price_per_1m=1, output_price_per_1m=2)
CATALOG = Catalog(models=[CHEAP])
SERDE = Serde()
TOPICS = Topics("tc.")
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _headers(trace: str = TRACE) -> list[tuple[str, bytes]]:
    return [
        ("tenant", b"acme"),
        ("correlation_id", b"order-7"),
        ("traceparent", trace.encode()),
        ("tracestate", b"vendor=1"),
        ("unrelated", b"x"),
    ]


def _request(content: str = "hello", **kw: Any) -> InferenceRequest:
    return InferenceRequest.model_validate(
        {"tenant": "acme", "messages": [ChatMessage(role="user", content=content)], **kw}
    )


def test_the_producer_sends_the_callers_trace_or_starts_one() -> None:
    broker = StubBroker()
    settings = Settings(publish_status=False)
    topic = Topics(settings.topic_prefix).requests("normal")
    broker.create_topic(topic)
    client = SluiceClient(settings, serde=SERDE, producer=broker.producer())
    client.submit("hi", tenant="acme", correlation_id="c1", traceparent=TRACE)
    client.submit("hi again")
    client.flush()
    sent = [m.headers() for m in broker.messages(topic)]
    assert header(sent[0], "traceparent") == TRACE and header(sent[0], "correlation_id") == "c1"
    started = header(sent[1], "traceparent")
    assert started is not None and valid_traceparent(started) and started != TRACE
    with pytest.raises(ConfigError, match="traceparent"):
        client.submit("hi", traceparent="not-a-trace")


def test_the_router_keeps_the_headers_on_the_dedupe_path_and_on_rejections() -> None:
    pipe = RequestPipeline(CATALOG, TOPICS, SERDE, ProcessorSettings())
    fwds = pipe.process(
        SERDE.encode(_request()), topic=TOPICS.requests("normal"), partition=0, offset=1, headers=_headers()
    )
    to_dedupe = next(f for f in fwds if f.topic == TOPICS.dedupe)
    assert carried(to_dedupe.headers) == carried(_headers())
    assert header(to_dedupe.headers, "kind") == "request"
    # Not routable: the failed result keeps the headers too.
    bad = pipe.process(
        SERDE.encode(_request(model="missing")),
        topic=TOPICS.requests("normal"),
        partition=0,
        offset=2,
        headers=_headers(),
    )
    result = next(f for f in bad if f.topic == TOPICS.results)
    assert header(result.headers, "traceparent") == TRACE


def _routed(content: str = "same") -> InferenceRequest:
    r = _request(content)
    r.route = Route(model="cheap", reason="test")
    r.dedupe_key = dedupe_key(r, ProcessorSettings())
    return r


def _result(r: InferenceRequest) -> InferenceResult:
    return InferenceResult.for_request(
        r, model="cheap", status=ResultStatus.SUCCEEDED, started_at=utcnow(), output_text="answer", engine_run_id="e"
    )


def test_each_request_answered_by_dedupe_gets_its_own_headers() -> None:
    stage = DedupeStage({}, Emitter(TOPICS, SERDE, CATALOG), ProcessorSettings())
    first, dup, later = _routed(), _routed(), _routed()
    forwarded = stage.on_request(first, SERDE.encode(first), 0, _headers(TRACE))
    model_fwd = next(f for f in forwarded if f.topic == TOPICS.model("cheap", "normal"))
    assert header(model_fwd.headers, "traceparent") == TRACE
    stage.on_request(dup, SERDE.encode(dup), 0, _headers(OTHER))
    released = stage.on_completed(_result(first))
    dup_result = next(f for f in released if f.topic == TOPICS.results)
    assert header(dup_result.headers, "traceparent") == OTHER  # the duplicate's own trace
    assert header(dup_result.headers, "correlation_id") == "order-7"
    cache_hit = stage.on_request(later, SERDE.encode(later), 0, _headers(TRACE))
    hit = next(f for f in cache_hit if f.topic == TOPICS.results)
    assert header(hit.headers, "traceparent") == TRACE and header(hit.headers, "tenant") == "acme"


def test_the_consumer_copies_the_headers_onto_results_retries_and_hand_backs() -> None:
    outcomes = Outcomes(CHEAP, CHEAP, TOPICS, RetrySettings(), run_id="run")
    req = _request()
    item = Buffered("tc.model.cheap.normal", 0, 5, SERDE.encode(req), req, 0.0, None, carried(_headers()))
    done = outcomes.succeeded(item, EngineOutput(req.request_id, "hi", 3, 1, "stop"), utcnow(), Usage())
    for out in done:
        if out.topic in (TOPICS.results, TOPICS.cost_metrics):
            assert header(out.headers, "traceparent") == TRACE, out.topic
    retried = outcomes.retry_or_fail(item, "engine hiccup", utcnow())
    retry = next(o for o in retried if o.topic.startswith("tc.retry."))
    assert header(retry.headers, "target") == item.topic and header(retry.headers, "traceparent") == TRACE
    (back, *_) = outcomes.handback(item, "shutdown")
    assert header(back.headers, "traceparent") == TRACE
