"""Consumer lag as Kafka's own tools report it (``kafka-consumer-groups.sh --describe``): per
topic, the records between a group's committed offset and the partition's end."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

from core.errors import BrokerError

__all__ = ["group_lag"]

logger = logging.getLogger(__name__)


def group_lag(admin: Any, group_id: str, topics: list[str], *, timeout: float = 5.0) -> dict[str, int]:
    """Records not yet committed by ``group_id`` on each of ``topics`` that exists. A partition the
    group never committed counts from its earliest record."""
    try:
        meta = admin.list_topics(timeout=timeout).topics
        parts = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]
        if not parts:
            return {}
        request = [ConsumerGroupTopicPartitions(group_id, parts)]
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in admin.list_consumer_group_offsets(request, request_timeout=timeout)[group_id]
            .result(timeout)
            .topic_partitions
        }
        ends = _offsets(admin, parts, OffsetSpec.latest(), timeout)  # type: ignore[no-untyped-call]
        starts = _offsets(admin, parts, OffsetSpec.earliest(), timeout)  # type: ignore[no-untyped-call]
    except KafkaException as exc:
        raise BrokerError(f"cannot read the lag of group {group_id}: {exc}") from exc
    lag: dict[str, int] = {}
    for tp in parts:
        key = (tp.topic, tp.partition)
        start = starts[key]
        # Negative: no committed offset (OFFSET_INVALID).
        position = max(committed.get(key, -1), start)
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends[key] - position)
    return lag


def _offsets(admin: Any, parts: list[TopicPartition], spec: OffsetSpec, timeout: float) -> dict[tuple[str, int], int]:
    futures = admin.list_offsets({tp: spec for tp in parts}, request_timeout=timeout)
    return {(tp.topic, tp.partition): f.result(timeout).offset for tp, f in futures.items()}
