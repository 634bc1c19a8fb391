"""The root of Sluice's one error hierarchy, and the errors the contracts themselves raise.

The root lives here, in the lowest layer, so that every package (this one included) can raise
``SluiceError`` subclasses without importing anything above it; ``sluice.errors`` re-exports
these and adds the runtime errors (broker, store, engine, catalog).
"""

from __future__ import annotations

from schemas.vocabulary import DeadLetterReason

__all__ = ["ConfigError", "PipelineRejection", "SerializationError", "SluiceError"]


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""


class ConfigError(SluiceError):
    """Settings or files that cannot be used as given."""


class PipelineRejection(SluiceError):
    """An event that must become a dead letter with a typed reason, not a crash."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message


class SerializationError(PipelineRejection):
    """Bytes that are not a decodable Sluice event (bad framing, unknown schema id, bad types)."""
