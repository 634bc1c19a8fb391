"""One error hierarchy for Sluice; boundaries wrap third-party errors with ``raise ... from``.

The root (``SluiceError``) and the contract errors live in ``schemas.errors`` (the lowest layer)
and are re-exported here beside the runtime errors.
"""

from __future__ import annotations

from schemas.errors import ConfigError, PipelineRejection, SerializationError, SluiceError
from schemas.vocabulary import DeadLetterReason

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


class CatalogError(ConfigError):
    """The model catalog is missing, malformed or inconsistent."""


class BrokerError(SluiceError):
    """The Kafka broker refused or failed an operation."""


class StoreError(SluiceError):
    """ClickHouse could not be reached or refused a statement."""


class EngineError(SluiceError):
    """The inference engine failed to start or to run a request."""
