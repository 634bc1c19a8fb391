"""The root of Sluice's one error hierarchy, and the errors the contracts themselves raise.

The root lives here, in the lowest layer, so that every package (this one included) can raise
``SluiceError`` subclasses without importing anything above it; ``core.errors`` re-exports
these and adds the runtime errors (broker, store, engine, catalog).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.vocabulary import DeadLetterReason

__all__ = ["ConfigError", "PipelineRejection", "SerializationError", "SluiceError", "validation_summary"]


def validation_summary(exc: ValidationError, limit: int = 5) -> str:
    """One line naming each invalid field: ``max_tokens: Input should be less than or equal to 32768``."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()]
    return "; ".join(parts[:limit])


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""


class ConfigError(SluiceError):
    """Settings or files that cannot be used as given."""


class PipelineRejection(SluiceError):
    """An event that must become a dead letter with a typed reason, not a crash."""

    def __init__(self, reason: DeadLetterReason, message: str, *, record: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message
        # The decoded fields of an event that was readable but invalid: enough, often, to tell
        # its requester (request id, tenant) that it was rejected.
        self.record = record


class SerializationError(PipelineRejection):
    """Bytes that are not a decodable Sluice event (bad framing, unknown schema id, bad types)."""
