"""Pydantic models mirroring the Avro schemas field for field (checked by a unit test)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.errors import DeadLetterReason

__all__ = [
    "AvroRecord",
    "ChatMessage",
    "CostMetric",
    "DeadLetter",
    "InferenceRequest",
    "InferenceResult",
    "Priority",
    "RequestStatus",
    "Route",
    "new_id",
    "utcnow",
]

Priority = Literal["high", "normal", "low"]
PRIORITY_RANK: dict[str, int] = {"high": 0, "normal": 1, "low": 2}


def utcnow() -> datetime:
    # Avro timestamp-millis: keep millisecond precision so round trips compare equal.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class AvroRecord(BaseModel):
    """A model with an Avro schema file; ``schema_file`` names it in ``schemas/avro``."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    schema_file: ClassVar[str]

    def to_avro(self) -> dict[str, object]:
        return self.model_dump(mode="python")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    reason: str
    task_type: str = "general"
    tier: int = 1
    estimated_input_tokens: int = 0
    routed_at: datetime = Field(default_factory=utcnow)


class InferenceRequest(AvroRecord):
    schema_file: ClassVar[str] = "inference_request.v1.avsc"

    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    tenant: str = Field(default="default", min_length=1, max_length=128)
    priority: Priority = "normal"
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int = Field(default=256, gt=0, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    deadline: datetime | None = None
    correlation_id: str | None = None
    idempotency_key: str | None = None
    cache: bool = True
    replay_of: str | None = None
    attempt: int = Field(default=0, ge=0)
    metadata: dict[str, str] = Field(default_factory=dict)
    dedupe_key: str | None = None
    route: Route | None = None

    @field_validator("messages")
    @classmethod
    def _has_content(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.content.strip() for m in messages):
            raise ValueError("all messages are empty")
        return messages

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class InferenceResult(AvroRecord):
    schema_file: ClassVar[str] = "inference_result.v1.avsc"

    request_id: str
    tenant: str
    priority: str
    model: str
    status: Literal["succeeded", "failed"]
    output_text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    created_at: datetime
    started_at: datetime
    completed_at: datetime
    correlation_id: str | None = None
    route_reason: str | None = None
    deduplicated_from: str | None = None
    cached: bool = False
    replay_of: str | None = None
    batch_id: str | None = None
    dedupe_key: str | None = None
    attempt: int = 0

    @property
    def latency_ms(self) -> int:
        return int((self.completed_at - self.created_at).total_seconds() * 1000)


class DeadLetter(AvroRecord):
    schema_file: ClassVar[str] = "dead_letter.v1.avsc"

    dead_letter_id: str = Field(default_factory=new_id)
    reason: DeadLetterReason
    error: str
    request_id: str | None = None
    tenant: str | None = None
    model: str | None = None
    priority: str | None = None
    source_topic: str
    source_partition: int
    source_offset: int
    attempt: int = 0
    original: bytes
    stage: Literal["processor", "consumer"]
    created_at: datetime = Field(default_factory=utcnow)

    def to_avro(self) -> dict[str, object]:
        data = super().to_avro()
        data["reason"] = self.reason.value
        return data


class CostMetric(AvroRecord):
    schema_file: ClassVar[str] = "cost_metric.v1.avsc"

    request_id: str
    tenant: str
    priority: str
    model: str
    input_tokens: int
    output_tokens: int
    queue_wait_ms: int
    engine_ms: float
    latency_ms: int
    cost_usd: float
    baseline_cost_usd: float
    batch_id: str | None = None
    batch_size: int = 1
    cached: bool = False
    deduplicated: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class RequestStatus(AvroRecord):
    schema_file: ClassVar[str] = "request_status.v1.avsc"

    request_id: str
    state: Literal[
        "queued",
        "deduplicated",
        "cached",
        "routed",
        "running",
        "succeeded",
        "failed",
        "expired",
        "cancelled",
    ]
    at: datetime = Field(default_factory=utcnow)
    model: str | None = None
    detail: str | None = None
