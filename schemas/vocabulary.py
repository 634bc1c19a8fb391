"""The wire vocabulary: closed sets of values that travel in events, mirrored from the ``.avsc``.

``DeadLetterReason`` mirrors the Avro enum of ``dead_letter.v1.avsc`` symbol for symbol. The
others travel as Avro strings (an enum cannot be added to a string field compatibly); their
symbols are listed in the field's ``doc`` there. ``tests/unit/test_vocabulary.py`` compares both.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BatchState",
    "CacheKind",
    "DeadLetterReason",
    "Endpoint",
    "Priority",
    "RequestState",
    "ResultStatus",
    "Stage",
]


class Endpoint(StrEnum):
    """The OpenAI endpoints a batch (and its lines) may name."""

    CHAT_COMPLETIONS = "/v1/chat/completions"
    RESPONSES = "/v1/responses"


class Priority(StrEnum):
    """A request's priority; it picks the request and model topics (``requests.<priority>``)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Lower runs first (0 = high), as in vLLM's priority scheduler."""
        return _RANK[self]

    @classmethod
    def by_rank(cls, rank: int) -> Priority:
        return _ORDER[max(0, min(rank, len(_ORDER) - 1))]


_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)
_RANK: dict[Priority, int] = {p: i for i, p in enumerate(_ORDER)}


class RequestState(StrEnum):
    """Lifecycle states on the status topic, in lifecycle order."""

    QUEUED = "queued"
    ROUTED = "routed"
    DEDUPLICATED = "deduplicated"
    CACHED = "cached"
    RUNNING = "running"
    # Its deadline is close enough that it may be missed (said once, while there is time to act).
    AT_RISK = "at_risk"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    # The result exists (topic, ClickHouse) but its webhook could not be delivered.
    WEBHOOK_FAILED = "webhook_failed"


class CacheKind(StrEnum):
    """How a cached answer matched its request (``cache_kind`` on results and cost metrics)."""

    # The same content key (model hint, messages, sampling parameters) answered before.
    EXACT = "exact"
    # A near-duplicate prompt of the same tenant and route answered before (the semantic cache).
    SEMANTIC = "semantic"


class BatchState(StrEnum):
    """A batch's lifecycle, OpenAI's Batch API states."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({BatchState.COMPLETED, BatchState.FAILED, BatchState.EXPIRED, BatchState.CANCELLED})


class ResultStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Stage(StrEnum):
    """Which stage wrote a dead letter."""

    PROCESSOR = "processor"
    CONSUMER = "consumer"
    GATEWAY = "gateway"
    # Result delivery after the results topic: webhooks and the fan-out to tenant and reply topics.
    DELIVERY = "delivery"
    SINK = "sink"


class DeadLetterReason(StrEnum):
    """Closed set of reasons a request becomes a dead letter (the Avro enum ``DeadLetterReason``)."""

    MALFORMED_EVENT = "malformed_event"
    SCHEMA_MISMATCH = "schema_mismatch"
    VALIDATION_ERROR = "validation_error"
    UNKNOWN_MODEL = "unknown_model"
    CONTEXT_OVERFLOW = "context_overflow"
    ENGINE_ERROR = "engine_error"
    DEADLINE_EXPIRED = "deadline_expired"
    CANCELLED = "cancelled"
    RETRIES_EXHAUSTED = "retries_exhausted"
    # The Avro enum's default: a reader meets it when a newer writer used a symbol it lacks.
    UNKNOWN = "unknown"
    # The request names a reply topic its tenant may not write to.
    REPLY_TO_REFUSED = "reply_to_refused"
    # Every delivery attempt of a result's webhook failed within the retry window.
    WEBHOOK_FAILED = "webhook_failed"
    # The request's batch reached its completion window before the request ran.
    BATCH_EXPIRED = "batch_expired"
    # ClickHouse refused a row for good (bad data); the event stays on its topic, the rest go on.
    STORE_REFUSED = "store_refused"
    # Admitting the request would pass its tenant's quota of enqueued tokens.
    QUOTA_EXCEEDED = "quota_exceeded"

    @property
    def state(self) -> RequestState:
        """The request state a dead letter of this reason ends in."""
        return _REASON_STATE.get(self, RequestState.FAILED)


_REASON_STATE = {
    DeadLetterReason.DEADLINE_EXPIRED: RequestState.EXPIRED,
    DeadLetterReason.CANCELLED: RequestState.CANCELLED,
    DeadLetterReason.BATCH_EXPIRED: RequestState.EXPIRED,
    DeadLetterReason.WEBHOOK_FAILED: RequestState.WEBHOOK_FAILED,
}
