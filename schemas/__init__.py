"""Stage 1: the event contracts. Avro schemas (``avro/*.avsc``), pydantic mirrors, and
Confluent-wire-format serializers usable by any Kafka client with a Schema Registry."""

from schemas.models import (
    ChatMessage,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestStatus,
    Route,
    utcnow,
)
from schemas.registry import ConfluentSchemaRegistry, LocalSchemaRegistry, SchemaRegistry
from schemas.serde import AvroDeserializer, AvroSerializer, Serde

__all__ = [
    "AvroDeserializer",
    "AvroSerializer",
    "ChatMessage",
    "ConfluentSchemaRegistry",
    "CostMetric",
    "DeadLetter",
    "InferenceRequest",
    "InferenceResult",
    "LocalSchemaRegistry",
    "Priority",
    "RequestStatus",
    "Route",
    "SchemaRegistry",
    "Serde",
    "utcnow",
]
