"""The records a rejected message becomes, whichever stage rejected it (router or GPU consumer):
a typed dead letter, and, when its requester can still be read from it, a failed result and a
status event. Errors are data: the stage goes on with the next message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.headers import Headers
from core.kafka import Out
from core.topics import Topics
from schemas import (
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    PipelineRejection,
    Priority,
    RequestIdentity,
    RequestStatus,
    Stage,
)

__all__ = ["Source", "rejection_records"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """The consumed message a rejection is about: where it was, and its bytes as they arrived."""

    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp_ms: int | None = None


def rejection_records(
    rejection: PipelineRejection,
    *,
    source: Source,
    stage: Stage,
    topics: Topics,
    request: InferenceRequest | None = None,
    model: str | None = None,
    headers: Headers | None = None,
    publish_status: bool = True,
) -> list[Out]:
    """``request``: the message decoded, when it was a readable request that failed a check;
    otherwise its requester is read, if possible, from the fields the rejection kept."""
    logger.warning("dead letter from %s[%d]@%d: %s", source.topic, source.partition, source.offset, rejection)
    who: InferenceRequest | RequestIdentity | None = request or RequestIdentity.of(
        rejection.record, priority=topics.priority_of(source.topic) or Priority.NORMAL
    )
    dl = DeadLetter.from_event(
        rejection.reason,
        rejection.detail,
        stage=stage,
        topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        original=source.value,
        timestamp_ms=source.timestamp_ms,
        request=who,
        model=model,
    )
    hdrs = list(headers or [])
    if who is None:
        return [Out(topics.dead_letter, None, dl, hdrs)]
    rid = who.request_id
    result_model = model or (who.model if isinstance(who, InferenceRequest) else None) or ""
    # The submitter is told too: a failed result, whichever stage failed it.
    result = InferenceResult.failed(who, rejection.reason, rejection.detail, model=result_model)
    out = [Out(topics.dead_letter, rid, dl, hdrs), Out(topics.results, rid, result, hdrs)]
    if publish_status:
        out.append(
            Out(topics.status, rid, RequestStatus.of(rid, rejection.reason.state, model=model, detail=str(rejection)))
        )
    return out
