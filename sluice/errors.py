"""One error hierarchy for Sluice; boundaries wrap third-party errors with ``raise ... from``."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BrokerError",
    "CatalogError",
    "ConfigError",
    "DeadLetterReason",
    "EngineError",
    "PipelineRejection",
    "SerializationError",
    "SluiceError",
    "StoreError",
]


class DeadLetterReason(StrEnum):
    """Closed set of reasons a request becomes a dead letter (mirrors the Avro enum)."""

    MALFORMED_EVENT = "malformed_event"
    SCHEMA_MISMATCH = "schema_mismatch"
    VALIDATION_ERROR = "validation_error"
    UNKNOWN_MODEL = "unknown_model"
    CONTEXT_OVERFLOW = "context_overflow"
    ENGINE_ERROR = "engine_error"
    DEADLINE_EXPIRED = "deadline_expired"
    CANCELLED = "cancelled"
    RETRIES_EXHAUSTED = "retries_exhausted"


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""


class ConfigError(SluiceError):
    """Settings or files that cannot be used as given."""


class CatalogError(ConfigError):
    """The model catalog is missing, malformed or inconsistent."""


class BrokerError(SluiceError):
    """The Kafka broker refused or failed an operation."""


class StoreError(SluiceError):
    """ClickHouse could not be reached or refused a statement."""


class EngineError(SluiceError):
    """The inference engine failed to start or to run a batch."""


class PipelineRejection(SluiceError):
    """An event that must become a dead letter with a typed reason, not a crash."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message


class SerializationError(PipelineRejection):
    """Bytes that are not a decodable Sluice event (bad framing, unknown schema id, bad types)."""
