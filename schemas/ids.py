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


def dead_letter_id(stage: str, topic: str, partition: int, offset: int) -> str:
    """Deterministic, so a redelivered poison event maps to the same dead letter row."""
    return hashlib.sha1(f"{stage}|{topic}|{partition}|{offset}".encode()).hexdigest()[:24]
