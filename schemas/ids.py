"""Identifiers and timestamps as the contracts define them."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

__all__ = ["dead_letter_id", "new_id", "utcnow"]


def utcnow() -> datetime:
    # Avro timestamp-millis: keep millisecond precision so round trips compare equal.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


def dead_letter_id(
    stage: str, topic: str, partition: int, offset: int, *, timestamp_ms: int | None = None, original: bytes = b""
) -> str:
    """The same for the same message processed again (a redelivered poison event replaces its dead
    letter row rather than adding one), and different for different messages even where
    (topic, partition, offset) repeat: a new broker, or another cluster, numbers offsets from 0
    again, so the record's timestamp and a hash of its bytes are part of the id."""
    content = hashlib.sha1(original).hexdigest()
    key = f"{stage}|{topic}|{partition}|{offset}|{timestamp_ms if timestamp_ms is not None else ''}|{content}"
    return hashlib.sha1(key.encode()).hexdigest()[:24]
