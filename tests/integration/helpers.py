"""Helpers for end-to-end tests: raw produce, topic reads, and ClickHouse lookups by request id."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from analytics.store import Store
from core import clients
from core.settings import Settings
from schemas import AvroRecord, Serde

R = TypeVar("R", bound=AvroRecord)


def produce_raw(settings: Settings, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    p = clients.producer(settings.kafka, "test")
    for v in values:
        p.produce(topic, key=key, value=v)
    assert p.flush(30) == 0


def result_counts(store: Store, ids: list[str]) -> dict[str, int]:
    """Result rows per request id as inserted (no FINAL, which would collapse duplicates)."""
    rows = store.query(
        "SELECT request_id, count() FROM sluice.results WHERE request_id IN {ids:Array(String)} GROUP BY request_id",
        {"ids": ids},
    ).rows
    return {r[0]: int(r[1]) for r in rows}


def dead_letters(store: Store, prefix: str) -> list[dict[str, Any]]:
    return store.query(
        "SELECT reason, request_id, source_topic, stage, error, lower(hex(original)) AS original_hex "
        "FROM sluice.dead_letters FINAL "
        "WHERE startsWith(source_topic, {p:String}) ORDER BY source_topic, source_offset",
        {"p": prefix},
    ).dicts()


def topic_keys(settings: Settings, topics: list[str], quiet_s: float = 3.0, timeout: float = 60.0) -> list[str]:
    """Every message key on ``topics`` from the start, read until nothing new arrives for ``quiet_s``
    (end offsets are not trusted: some brokers misreport the high watermark)."""
    consumer = clients.consumer(settings.kafka, "test", f"{settings.topic_prefix}probe-{uuid.uuid4().hex[:6]}")
    # Assigned, not subscribed: no group join to wait for.
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta[t].partitions])
    keys: list[str] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() - last_new < quiet_s and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    keys.append((msg.key() or b"").decode())
                    last_new = time.monotonic()
    finally:
        consumer.close()
    return keys


def topic_records(
    settings: Settings, topic: str, record_type: type[R], serde: Serde, quiet_s: float = 3.0, timeout: float = 60.0
) -> list[R]:
    """Every record on ``topic`` from the start, decoded (read until nothing new for ``quiet_s``)."""
    consumer = clients.consumer(settings.kafka, "test", f"{settings.topic_prefix}probe-{uuid.uuid4().hex[:6]}")
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta[topic].partitions])
    out: list[R] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() - last_new < quiet_s and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.1):
                if msg.error() is None and msg.value() is not None:
                    out.append(serde.decode(record_type, msg.value()))
                    last_new = time.monotonic()
    finally:
        consumer.close()
    return out


def results(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = store.query(
        "SELECT * FROM sluice.results FINAL WHERE request_id IN {ids:Array(String)}",
        {"ids": ids},
    ).dicts()
    return {r["request_id"]: r for r in rows}


class TopicCounter:
    """One reader of ``topic`` from the beginning, kept open: :meth:`counts` returns the messages
    per key seen so far, up to date within a poll. (A new reader per check can see nothing until
    its first fetch completes, which on some brokers takes seconds.)"""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._consumer = clients.consumer(
            settings.kafka, "test", f"{settings.topic_prefix}counter-{uuid.uuid4().hex[:6]}"
        )
        meta = self._consumer.list_topics(timeout=10).topics
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta[topic].partitions])
        self._counts: Counter[str] = Counter()

    def counts(self) -> Counter[str]:
        while msgs := self._consumer.consume(500, timeout=0.1):
            for msg in msgs:
                if msg.error() is None:
                    self._counts[(msg.key() or b"").decode()] += 1
        return Counter(self._counts)

    def close(self) -> None:
        self._consumer.close()
