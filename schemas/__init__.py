"""Stage 1: the event contracts. Avro schemas (``avro/*.avsc``), pydantic mirrors with the record
constructors every stage uses, the wire vocabulary as enums, and Confluent-wire-format
serializers usable by any Kafka client with a Schema Registry.

This package imports nothing from the rest of Sluice: every service shares it.
"""

from schemas.errors import ConfigError, PipelineRejection, SerializationError, SluiceError
from schemas.ids import dead_letter_id, new_id, utcnow
from schemas.models import (
    QUOTA_KEY,
    QUOTA_KEY_TOKENS,
    AvroRecord,
    BatchStatus,
    ChatMessage,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    QuotaEntry,
    RequestIdentity,
    RequestStatus,
    Route,
)
from schemas.registry import ConfluentSchemaRegistry, LocalSchemaRegistry, SchemaRegistry
from schemas.serde import AvroDeserializer, AvroSerializer, Serde
from schemas.vocabulary import (
    BatchState,
    CacheKind,
    DeadLetterReason,
    Endpoint,
    Priority,
    RequestState,
    ResultStatus,
    Stage,
)

__all__ = [
    "QUOTA_KEY",
    "QUOTA_KEY_TOKENS",
    "AvroDeserializer",
    "AvroRecord",
    "AvroSerializer",
    "BatchState",
    "BatchStatus",
    "CacheKind",
    "ChatMessage",
    "ConfigError",
    "ConfluentSchemaRegistry",
    "CostMetric",
    "DeadLetter",
    "DeadLetterReason",
    "Endpoint",
    "InferenceRequest",
    "InferenceResult",
    "LocalSchemaRegistry",
    "PipelineRejection",
    "Priority",
    "QuotaEntry",
    "RequestIdentity",
    "RequestState",
    "RequestStatus",
    "ResultStatus",
    "Route",
    "SchemaRegistry",
    "Serde",
    "SerializationError",
    "SluiceError",
    "Stage",
    "dead_letter_id",
    "new_id",
    "utcnow",
]
