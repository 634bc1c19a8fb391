"""The processor's per-event logic, free of Faust so it can be tested and benchmarked alone.

Every input event yields exactly one :class:`Forward` (a routed request or a dead letter):
bad input never raises out of :meth:`RequestPipeline.process`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from schemas import DeadLetter, InferenceRequest, Serde, utcnow
from sluice.catalog import Catalog
from sluice.errors import DeadLetterReason, PipelineRejection
from sluice.settings import ProcessorSettings
from sluice.topics import Topics
from stream_processors.router import Router

__all__ = ["Forward", "RequestPipeline", "dead_letter_id"]

logger = logging.getLogger(__name__)


def dead_letter_id(stage: str, topic: str, partition: int, offset: int) -> str:
    """Deterministic, so a redelivered poison event maps to the same dead letter row."""
    return hashlib.sha1(f"{stage}|{topic}|{partition}|{offset}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Forward:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    dead_letter: DeadLetter | None = None
    request: InferenceRequest | None = None


class RequestPipeline:
    def __init__(
        self,
        catalog: Catalog,
        topics: Topics,
        serde: Serde,
        settings: ProcessorSettings | None = None,
    ) -> None:
        self.topics = topics
        self.serde = serde
        self.router = Router(catalog)
        self.settings = settings or ProcessorSettings()

    def process(
        self,
        value: bytes | None,
        *,
        topic: str,
        partition: int,
        offset: int,
        headers: list[tuple[str, bytes]] | None = None,
        now: datetime | None = None,
    ) -> Forward:
        request: InferenceRequest | None = None
        try:
            request = self.serde.decode(InferenceRequest, value)
            self._validate(request, topic, now or utcnow())
            request.route = self.router.route(request)
        except PipelineRejection as exc:
            return self._dead_letter(exc, value or b"", topic, partition, offset, request)
        return Forward(
            topic=self.topics.model(request.route.model, request.priority),
            key=request.request_id.encode(),
            value=self.serde.encode(request),
            headers=list(headers or []),
            request=request,
        )

    def _validate(self, request: InferenceRequest, topic: str, now: datetime) -> None:
        if topic != self.topics.requests(request.priority):
            raise PipelineRejection(
                DeadLetterReason.VALIDATION_ERROR,
                f"priority {request.priority!r} does not match topic {topic}",
            )
        if request.prompt_chars() > self.settings.max_prompt_chars:
            raise PipelineRejection(
                DeadLetterReason.VALIDATION_ERROR,
                f"prompt has {request.prompt_chars()} characters; the limit is {self.settings.max_prompt_chars}",
            )
        if request.deadline is not None and request.deadline <= now:
            raise PipelineRejection(
                DeadLetterReason.DEADLINE_EXPIRED,
                f"deadline {request.deadline.isoformat()} passed before routing",
            )

    def _dead_letter(
        self,
        exc: PipelineRejection,
        original: bytes,
        topic: str,
        partition: int,
        offset: int,
        request: InferenceRequest | None,
    ) -> Forward:
        logger.warning("dead letter from %s[%d]@%d: %s", topic, partition, offset, exc)
        dl = DeadLetter(
            dead_letter_id=dead_letter_id("processor", topic, partition, offset),
            reason=exc.reason,
            error=exc.detail,
            request_id=request.request_id if request else None,
            tenant=request.tenant if request else None,
            model=request.model if request else None,
            priority=request.priority if request else None,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            attempt=request.attempt if request else 0,
            original=original,
            stage="processor",
        )
        key = request.request_id.encode() if request else None
        return Forward(topic=self.topics.dead_letter, key=key, value=self.serde.encode(dl), dead_letter=dl)
