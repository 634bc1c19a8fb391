"""Where a consumed message sits, and which fetched events are messages at all."""

from __future__ import annotations

import logging
from typing import Protocol

from confluent_kafka import KafkaError

from core.errors import BrokerError

__all__ = ["TP", "Fetched", "message_coords", "usable"]

TP = tuple[str, int]
"""A topic partition: (topic, partition)."""


class Fetched(Protocol):
    """The part of ``confluent_kafka.Message`` the runtime reads (the stub's messages have it too)."""

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...

    def error(self) -> KafkaError | None: ...


def message_coords(msg: Fetched) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message (always set for fetched messages)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def usable(msg: Fetched, log: logging.Logger) -> bool:
    """True for a message; an end-of-partition event is dropped quietly, another error is logged
    (librdkafka retries on its own), and a fatal one raises."""
    err = msg.error()
    if err is None:
        return True
    if err.code() == KafkaError._PARTITION_EOF:
        return False
    if err.fatal():
        raise BrokerError(f"fatal consumer error: {err.str()}")
    log.warning("consume error: %s", err.str())
    return False
