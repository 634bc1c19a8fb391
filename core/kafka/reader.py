"""Read whole topics without a consumer group: every partition from the beginning, taken in
without waiting (a local view of a compacted topic, such as the cancellations every GPU consumer
keeps)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaException, Message, TopicPartition

from core.errors import BrokerError
from core.kafka.coords import usable

__all__ = ["TopicReader"]

logger = logging.getLogger(__name__)


class TopicReader:
    def __init__(self, consumer: Any, topics: list[str], *, timeout: float = 10.0) -> None:
        """``consumer``: a consumer from the client factory (its group is never joined nor
        committed to) or the stub broker's."""
        self._consumer = consumer
        parts: list[TopicPartition] = []
        for topic in topics:
            try:
                meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
            except KafkaException as exc:
                raise BrokerError(f"cannot read {topic}: {exc}") from exc
            if meta.error is not None:
                raise BrokerError(f"cannot read {topic}: {meta.error}")
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(parts)

    def take(self, limit: int = 1000) -> Iterator[Message]:
        """Every message fetched so far (none waited for)."""
        while True:
            msgs = self._consumer.consume(limit, timeout=0)
            if not msgs:
                return
            yield from (m for m in msgs if usable(m, logger))

    def close(self) -> None:
        self._consumer.close()
