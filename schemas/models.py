"""Pydantic models mirroring the Avro schemas field for field (checked by a unit test), and the
constructors every stage builds its records with (so a failed result or a dead letter looks the
same whichever stage wrote it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.ids import dead_letter_id, new_id, utcnow
from schemas.vocabulary import BatchState, CacheKind, DeadLetterReason, Priority, RequestState, ResultStatus, Stage

__all__ = [
    "QUOTA_KEY",
    "QUOTA_KEY_TOKENS",
    "AvroRecord",
    "BatchStatus",
    "ChatMessage",
    "CostMetric",
    "DeadLetter",
    "InferenceRequest",
    "InferenceResult",
    "QuotaEntry",
    "RequestIdentity",
    "RequestStatus",
    "Route",
]

# Request metadata the gateway sets (a caller's own values are dropped): the id of the API key a
# request came with and that key's quota of enqueued tokens, for keys that have one.
QUOTA_KEY = "quota_key"
QUOTA_KEY_TOKENS = "quota_key_tokens"


class AvroRecord(BaseModel):
    """A model with an Avro schema file; ``schema_file`` names it in ``schemas/avro``."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    schema_file: ClassVar[str]

    @field_validator("*", mode="after")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        # Every timestamp on the wire is UTC: a reader that hands back naive datetimes (a JSON
        # round trip, a driver) gets them marked as UTC, so they compare with aware ones.
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

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
    priority: Priority = Priority.NORMAL
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int = Field(default=256, gt=0, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # An Avro long on the wire.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
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
    batch_id: str | None = Field(default=None, max_length=128)
    custom_id: str | None = Field(default=None, max_length=512)
    stop: list[str] = Field(default_factory=list, max_length=4)
    # OpenAI's response_format as JSON text ({"type": "json_object"} or a json_schema); kept as
    # text on the wire so a new format needs no schema change.
    response_format: str | None = None
    reply_to: str | None = Field(default=None, max_length=249)
    webhook_url: str | None = Field(default=None, max_length=2048)

    @field_validator("messages")
    @classmethod
    def _has_content(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.content.strip() for m in messages):
            raise ValueError("all messages are empty")
        return messages

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def enqueued_tokens(self) -> int:
        """What the request asks of an engine, in tokens: its prompt (about four characters a
        token) and every token it may generate (what quotas and fair share count)."""
        return self.prompt_chars() // 4 + self.max_tokens


class RequestIdentity(BaseModel):
    """Who asked, for a request that was readable but invalid: enough to send its requester a
    failed result (the full :class:`InferenceRequest` could not be built)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(default="default", min_length=1, max_length=128)
    priority: Priority = Priority.NORMAL
    created_at: datetime = Field(default_factory=utcnow)
    correlation_id: str | None = None
    replay_of: str | None = None
    attempt: int = 0
    route: Route | None = None
    dedupe_key: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    reply_to: str | None = None
    webhook_url: str | None = None

    @classmethod
    def of(cls, record: dict[str, Any] | None, *, priority: Priority = Priority.NORMAL) -> RequestIdentity | None:
        """The identity in a decoded record, field by field: an invalid field falls back to its
        default (``priority`` to the given one); ``None`` without a usable request id."""
        if not record:
            return None
        fields: dict[str, Any] = {"priority": priority}
        for name in cls.model_fields:
            if name in record and record[name] is not None:
                try:
                    cls.__pydantic_validator__.validate_assignment(cls.model_construct(), name, record[name])
                except ValueError:
                    continue
                fields[name] = record[name]
        try:
            return cls.model_validate(fields)
        except ValueError:
            return None


class InferenceResult(AvroRecord):
    schema_file: ClassVar[str] = "inference_result.v1.avsc"

    request_id: str
    tenant: str
    priority: Priority
    model: str
    status: ResultStatus
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
    custom_id: str | None = None
    engine_run_id: str | None = None
    reply_to: str | None = None
    webhook_url: str | None = None
    cache_kind: CacheKind | None = None
    similarity: float | None = None

    @property
    def latency_ms(self) -> int:
        return int((self.completed_at - self.created_at).total_seconds() * 1000)

    @property
    def queue_wait_ms(self) -> int:
        return int((self.started_at - self.created_at).total_seconds() * 1000)

    @classmethod
    def for_request(
        cls,
        request: InferenceRequest | RequestIdentity,
        *,
        model: str,
        status: ResultStatus,
        started_at: datetime,
        completed_at: datetime | None = None,
        **fields: Any,
    ) -> InferenceResult:
        """A result answering ``request``: identity, lineage and routing copied from it."""
        return cls.model_validate(
            {
                "request_id": request.request_id,
                "tenant": request.tenant,
                "priority": request.priority,
                "model": model,
                "status": status,
                "created_at": request.created_at,
                "started_at": started_at,
                "completed_at": completed_at or utcnow(),
                "correlation_id": request.correlation_id,
                "route_reason": request.route.reason if request.route else None,
                "replay_of": request.replay_of,
                "dedupe_key": request.dedupe_key,
                "attempt": request.attempt,
                "batch_id": request.batch_id,
                "custom_id": request.custom_id,
                "reply_to": request.reply_to,
                "webhook_url": request.webhook_url,
                **fields,
            }
        )

    def stored(self) -> dict[str, Any]:
        """What a dedupe or cache table keeps of this result to answer later requests with
        (JSON-serialisable; read back by :meth:`answered_from`)."""
        return {
            "model": self.model,
            "status": self.status.value,
            "output_text": self.output_text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": self.error,
            "started_at": self.started_at.timestamp(),
        }

    @classmethod
    def answered_from(
        cls,
        request: InferenceRequest,
        stored: dict[str, Any],
        *,
        original: str,
        cache_kind: CacheKind | None = None,
        similarity: float | None = None,
    ) -> InferenceResult:
        """The result ``request`` gets from the stored result (:meth:`stored`) of request
        ``original``: an attached duplicate (``cache_kind`` unset) started with its original; a
        cache hit starts now."""
        now = utcnow()
        # .get: entries stored by an earlier release keep only what a success needs.
        started_ts = stored.get("started_at")
        started = now if cache_kind is not None or started_ts is None else datetime.fromtimestamp(started_ts, UTC)
        return cls.for_request(
            request,
            model=stored["model"],
            status=ResultStatus(stored.get("status", ResultStatus.SUCCEEDED.value)),
            started_at=max(request.created_at, started),
            completed_at=now,
            output_text=stored["output_text"],
            finish_reason=stored["finish_reason"],
            prompt_tokens=stored["prompt_tokens"],
            completion_tokens=stored["completion_tokens"],
            error=stored.get("error"),
            deduplicated_from=original,
            cached=cache_kind is not None,
            cache_kind=cache_kind,
            similarity=None if similarity is None else round(similarity, 4),
        )

    @classmethod
    def failed(
        cls,
        request: InferenceRequest | RequestIdentity,
        reason: DeadLetterReason,
        error: str,
        *,
        model: str,
        started_at: datetime | None = None,
        **fields: Any,
    ) -> InferenceResult:
        """The failed result a submitter gets for a dead-lettered request (``error`` = "reason: detail")."""
        now = utcnow()
        return cls.for_request(
            request,
            model=model,
            status=ResultStatus.FAILED,
            started_at=started_at or now,
            completed_at=now,
            error=f"{reason.value}: {error}",
            **fields,
        )


class DeadLetter(AvroRecord):
    schema_file: ClassVar[str] = "dead_letter.v1.avsc"

    dead_letter_id: str = Field(default_factory=new_id)
    reason: DeadLetterReason
    error: str
    request_id: str | None = None
    tenant: str | None = None
    model: str | None = None
    priority: Priority | None = None
    source_topic: str
    source_partition: int
    source_offset: int
    attempt: int = 0
    original: bytes
    stage: Stage
    created_at: datetime = Field(default_factory=utcnow)

    def to_avro(self) -> dict[str, object]:
        data = super().to_avro()
        data["reason"] = self.reason.value
        return data

    @classmethod
    def from_event(
        cls,
        reason: DeadLetterReason,
        error: str,
        *,
        stage: Stage,
        topic: str,
        partition: int,
        offset: int,
        original: bytes,
        timestamp_ms: int | None = None,
        request: InferenceRequest | RequestIdentity | None = None,
        model: str | None = None,
    ) -> DeadLetter:
        """The dead letter for the event at (topic, partition, offset) written at ``timestamp_ms``;
        its id is deterministic, so processing the same event again replaces rather than adds a row."""
        return cls(
            dead_letter_id=dead_letter_id(
                stage, topic, partition, offset, timestamp_ms=timestamp_ms, original=original
            ),
            reason=reason,
            error=error,
            request_id=request.request_id if request else None,
            tenant=request.tenant if request else None,
            model=model if model is not None else (request.model if isinstance(request, InferenceRequest) else None),
            priority=request.priority if request else None,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            attempt=request.attempt if request else 0,
            original=original,
            stage=stage,
        )


class CostMetric(AvroRecord):
    schema_file: ClassVar[str] = "cost_metric.v1.avsc"

    request_id: str
    tenant: str
    priority: Priority
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
    engine_run_id: str | None = None
    cache_kind: CacheKind | None = None

    @classmethod
    def for_result(
        cls,
        result: InferenceResult,
        *,
        cost_usd: float,
        baseline_cost_usd: float,
        model: str | None = None,
        queue_wait_ms: int | None = None,
        engine_ms: float = 0.0,
        engine_run_id: str | None = None,
        batch_size: int = 1,
        cached: bool = False,
        deduplicated: bool = False,
    ) -> CostMetric:
        """The cost ledger line of ``result``; the caller prices the tokens from its catalog."""
        return cls(
            request_id=result.request_id,
            tenant=result.tenant,
            priority=result.priority,
            model=model or result.model,
            input_tokens=result.prompt_tokens,
            output_tokens=result.completion_tokens,
            queue_wait_ms=result.queue_wait_ms if queue_wait_ms is None else queue_wait_ms,
            engine_ms=engine_ms,
            latency_ms=result.latency_ms,
            cost_usd=cost_usd,
            baseline_cost_usd=baseline_cost_usd,
            batch_id=result.batch_id,
            engine_run_id=engine_run_id if engine_run_id is not None else result.engine_run_id,
            batch_size=batch_size,
            cached=cached,
            deduplicated=deduplicated,
            cache_kind=result.cache_kind if cached else None,
        )


class RequestStatus(AvroRecord):
    schema_file: ClassVar[str] = "request_status.v1.avsc"

    request_id: str
    state: RequestState
    at: datetime = Field(default_factory=utcnow)
    model: str | None = None
    detail: str | None = None
    tenant: str | None = None

    @classmethod
    def of(
        cls,
        request_id: str,
        state: RequestState,
        *,
        model: str | None = None,
        detail: str | None = None,
        tenant: str | None = None,
    ) -> RequestStatus:
        return cls(request_id=request_id, state=state, model=model, detail=detail, tenant=tenant)


class BatchStatus(AvroRecord):
    """A batch as it stands (OpenAI's lifecycle); the batch-status topic is compacted by id."""

    schema_file: ClassVar[str] = "batch_status.v1.avsc"

    batch_id: str
    tenant: str
    state: BatchState
    endpoint: str = "/v1/chat/completions"
    input_file_id: str
    completion_window: str = "24h"
    priority: Priority = Priority.LOW
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    webhook_url: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    updated_at: datetime = Field(default_factory=utcnow)
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    ended_at: datetime | None = None
    cancelling_at: datetime | None = None
    output_expires_after_s: int | None = None
    # Lines said at_risk so far (their deadline, the end of the completion window, may be missed).
    at_risk: int = 0

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def moved(self, state: BatchState, **fields: Any) -> BatchStatus:
        """This batch in ``state`` now, stamped with the matching ``*_at`` field."""
        now = utcnow()
        stamp = {
            BatchState.IN_PROGRESS: "in_progress_at",
            BatchState.FINALIZING: "finalizing_at",
            BatchState.CANCELLING: "cancelling_at",
        }.get(state, "ended_at" if state.terminal else None)
        extra = {stamp: now} if stamp else {}
        return self.model_copy(update={"state": state, "updated_at": now, **extra, **fields})


class QuotaEntry(AvroRecord):
    """Tokens a queued or running request holds against its tenant's quota (the quota-ledger
    topic, compacted by request id; a tombstone releases them)."""

    schema_file: ClassVar[str] = "quota_entry.v1.avsc"

    request_id: str
    tenant: str
    tokens: int
    at: datetime = Field(default_factory=utcnow)
    # The API key it came with, where that key has a token quota of its own.
    key: str | None = None

    @classmethod
    def for_request(cls, request: InferenceRequest) -> QuotaEntry:
        key = request.metadata.get(QUOTA_KEY)
        return cls(request_id=request.request_id, tenant=request.tenant, tokens=request.enqueued_tokens(), key=key)
