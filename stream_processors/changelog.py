"""A Faust table whose changelog goes out through the agents' librdkafka producer.

Each table write is one changelog record. Through Faust's producer that record costs an asyncio
future, a Faust channel hop and pure-Python batch building in aiokafka, once per routed request;
through the :class:`~stream_processors.sender.KafkaSender` it is one ``produce`` call into C.

At-least-once stays as strong: the consumer settles the sender (every record acknowledged)
before it commits any source offset, as it does for the agents' own records. Order per changelog
partition is kept: every write of a table goes through the one producer, whose idempotence keeps
a partition's records in produce order.

What the table gives up is Faust's callback on a sent changelog record, which records the
record's offset in the store for a faster recovery. The router keeps its tables in memory
(``store="memory://"``), where that offset is never kept: recovery reads the changelog from its
start either way.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import faust

__all__ = ["SenderTable"]


class SenderTable(faust.Table):  # type: ignore[misc]
    """``faust.Table`` that writes its changelog through ``app.sender`` when the app has one."""

    def send_changelog(
        self,
        partition: int | None,
        key: Any,
        value: Any,
        key_serializer: Any = None,
        value_serializer: Any = None,
    ) -> Any:
        sender = getattr(self.app, "sender", None)
        if sender is None or partition is None:
            return super().send_changelog(partition, key, value, key_serializer, value_serializer)
        topic = self.changelog_topic
        raw_key, _ = topic.prepare_key(key, key_serializer or self.key_serializer)
        raw_value, _ = topic.prepare_value(value, value_serializer or self.value_serializer)
        sender.send(topic.get_topic_name(), raw_key, raw_value, [], partition)
        # What Faust's callers read of the future they get back: the record's partition.
        return SimpleNamespace(message=SimpleNamespace(partition=partition))
