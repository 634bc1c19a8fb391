"""A subscriber of the results topic sees each request's own trace context, tenant and
correlation id on its result, whether it ran, was deduplicated or failed routing."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from core import clients
from core.headers import header
from core.settings import Settings
from producers import SluiceClient
from sluice.local.stack import LocalStack

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _result_headers(settings: Settings, n: int, timeout: float = 90) -> dict[str, dict[str, str | None]]:
    consumer = clients.consumer(settings.kafka, "test", f"{settings.topic_prefix}probe-{uuid.uuid4().hex[:6]}")
    topic = f"{settings.topic_prefix}results"
    parts = consumer.list_topics(timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    seen: dict[str, dict[str, str | None]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < n and time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.2):
                if msg.error() is None:
                    h = msg.headers()
                    seen[(msg.key() or b"").decode()] = {
                        k: header(h, k) for k in ("traceparent", "tenant", "correlation_id")
                    }
    finally:
        consumer.close()
    return seen


def test_results_carry_their_requests_trace_context(stack: LocalStack) -> None:
    traces = [f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01" for _ in range(3)]
    with SluiceClient(stack.settings) as client:
        ran = client.submit("trace me", tenant="acme", correlation_id="c-1", traceparent=traces[0], max_tokens=3)
        dup = client.submit("trace me", tenant="acme", correlation_id="c-2", traceparent=traces[1], max_tokens=3)
        bad = client.submit("nowhere", tenant="acme", model="no-such-model", traceparent=traces[2])
    seen = _result_headers(stack.settings, 3)
    assert seen[ran] == {"traceparent": traces[0], "tenant": "acme", "correlation_id": "c-1"}
    assert seen[dup] == {"traceparent": traces[1], "tenant": "acme", "correlation_id": "c-2"}
    assert seen[bad]["traceparent"] == traces[2]
