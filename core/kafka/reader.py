"""Read whole topics without a consumer group: every partition from the beginning, taken in
without waiting (a local view of a compacted topic, such as the cancellations every GPU consumer
keeps), or from the end (what is written from now on, such as the results a gateway awaits)."""

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
    def __init__(self, consumer: Any, topics: list[str], *, timeout: float = 10.0, from_end: bool = False) -> None:
        """``consumer``: a consumer from the client factory (its group is never joined nor
        committed to) or the stub broker's. ``from_end``: each partition from its high watermark
        as the broker reports it now (an exact position, unlike ``auto.offset.reset=latest``, which
        is resolved at some later fetch: a record written in between would be missed)."""
        self._consumer = consumer
        self._partitions: dict[str, list[int]] = {}
        parts: list[TopicPartition] = []
        for topic in topics:
            try:
                meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
            except KafkaException as exc:
                raise BrokerError(f"cannot read {topic}: {exc}") from exc
            if meta.error is not None:
                raise BrokerError(f"cannot read {topic}: {meta.error}")
            self._partitions[topic] = sorted(meta.partitions)
            for p in meta.partitions:
                start = OFFSET_BEGINNING
                if from_end:
                    try:
                        start = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                    except KafkaException as exc:
                        raise BrokerError(f"cannot read the end of {topic}[{p}]: {exc}") from exc
                parts.append(TopicPartition(topic, p, start))
        consumer.assign(parts)

    def partitions(self, topic: str) -> list[int]:
        return list(self._partitions[topic])

    def take(self, limit: int = 1000, *, wait: float = 0.0) -> Iterator[Message]:
        """Every message fetched so far; ``wait``: how long to wait for a first one."""
        if wait > 0:
            # poll() returns as soon as one message is there; consume(n, timeout) would wait for n
            # messages or the whole timeout.
            first = self._consumer.poll(wait)
            if first is None:
                return
            if usable(first, logger):
                yield first
        while True:
            msgs = self._consumer.consume(limit, timeout=0)
            if not msgs:
                return
            yield from (m for m in msgs if usable(m, logger))

    def close(self) -> None:
        self._consumer.close()
