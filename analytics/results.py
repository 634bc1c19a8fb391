"""Follow the results topic, and render results in OpenAI's shapes: a ``chat.completion`` object,
and batch output and error lines (error codes mapped from the typed dead-letter reasons)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message

from core import clients
from core.errors import SluiceError
from core.kafka import TP, ConsumeLoop, Handler, message_coords
from core.settings import Settings
from core.topics import Topics
from schemas import DeadLetterReason, Endpoint, InferenceResult, ResultStatus, Serde

__all__ = [
    "chat_completion",
    "error_code",
    "error_line",
    "follow_results",
    "openai_batch_line",
    "output_line",
    "response_object",
]

logger = logging.getLogger(__name__)


# Typed dead-letter reasons -> the error codes callers of OpenAI's Batch API know.
_CODES = {
    DeadLetterReason.VALIDATION_ERROR: "invalid_request",
    DeadLetterReason.MALFORMED_EVENT: "invalid_request",
    DeadLetterReason.SCHEMA_MISMATCH: "invalid_request",
    DeadLetterReason.UNKNOWN_MODEL: "model_not_found",
    DeadLetterReason.CONTEXT_OVERFLOW: "context_length_exceeded",
    DeadLetterReason.DEADLINE_EXPIRED: "batch_expired",
    DeadLetterReason.BATCH_EXPIRED: "batch_expired",
    DeadLetterReason.CANCELLED: "batch_cancelled",
    DeadLetterReason.ENGINE_ERROR: "server_error",
    DeadLetterReason.RETRIES_EXHAUSTED: "server_error",
    DeadLetterReason.REPLY_TO_REFUSED: "reply_to_refused",
    DeadLetterReason.QUOTA_EXCEEDED: "quota_exceeded",
}


def chat_completion(r: InferenceResult) -> dict[str, Any]:
    """A succeeded result as OpenAI's ``chat.completion`` object."""
    return {
        "id": f"chatcmpl-{r.request_id}",
        "object": "chat.completion",
        "created": int(r.completed_at.timestamp()),
        "model": r.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.output_text},
                "finish_reason": r.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        },
        "system_fingerprint": None,
    }


def response_object(r: InferenceResult, echo: dict[str, Any] | None = None) -> dict[str, Any]:
    """A succeeded result as OpenAI's Responses API ``response`` object; ``echo``: the request's
    parameters it repeats (``instructions``, ``max_output_tokens``, ``text``, ``metadata``...)."""
    echo = echo or {}
    incomplete = r.finish_reason == "length"
    return {
        "id": f"resp_{r.request_id}",
        "object": "response",
        "created_at": int(r.created_at.timestamp()),
        "status": "incomplete" if incomplete else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": echo.get("instructions"),
        "max_output_tokens": echo.get("max_output_tokens"),
        "model": r.model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{r.request_id}",
                "status": "incomplete" if incomplete else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": r.output_text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": echo.get("temperature", 1.0),
        "text": echo.get("text", {"format": {"type": "text"}}),
        "tool_choice": "none",
        "tools": [],
        "top_p": echo.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": r.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": r.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        },
        "user": echo.get("user"),
        "metadata": echo.get("metadata") or {},
    }


def error_code(error: str | None) -> tuple[str, str]:
    """(OpenAI-style code, message) for a failed result's ``"reason: detail"`` error."""
    reason, _, detail = (error or "engine_error: unknown").partition(": ")
    try:
        return _CODES.get(DeadLetterReason(reason), reason), f"{reason}: {detail}"
    except ValueError:
        return reason, detail or reason


def output_line(
    r: InferenceResult, custom_id: str | None = None, *, endpoint: Endpoint = Endpoint.CHAT_COMPLETIONS
) -> dict[str, Any]:
    """One line of a batch's output (succeeded) or error (failed) file; the body in the shape of
    the batch's ``endpoint``."""
    cid = custom_id if custom_id is not None else r.custom_id
    if r.status is ResultStatus.SUCCEEDED:
        body = response_object(r) if endpoint is Endpoint.RESPONSES else chat_completion(r)
        return {
            "id": f"batch_req_{r.request_id}",
            "custom_id": cid,
            "response": {"status_code": 200, "request_id": r.request_id, "body": body},
            "error": None,
        }
    code, message = error_code(r.error)
    return error_line(r.request_id, cid, code, message)


def error_line(request_id: str, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def openai_batch_line(r: InferenceResult) -> str:
    """One line of OpenAI Batch API output JSONL; ``custom_id`` is the caller's, else the request id."""
    return json.dumps(output_line(r, r.custom_id or r.request_id))


class _Follower(Handler):
    def __init__(self, serde: Serde, on_result: Callable[[InferenceResult], None], on_ready: Callable[[], None] | None):
        self.serde = serde
        self.on_result = on_result
        self.on_ready = on_ready

    def on_assign(self, loop: ConsumeLoop, tps: list[TP]) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        topic, partition, offset = message_coords(msg)
        try:
            result = self.serde.decode(InferenceResult, msg.value())
        except SluiceError as exc:
            logger.error("skipped an undecodable result at %s[%d]@%d: %s", topic, partition, offset, exc)
        else:
            self.on_result(result)
        loop.done((topic, partition), offset)


def follow_results(
    settings: Settings,
    on_result: Callable[[InferenceResult], None],
    stop: threading.Event,
    *,
    group_id: str | None = None,
    serde: Serde | None = None,
    on_ready: Callable[[], None] | None = None,
    consumer: Any | None = None,
) -> None:
    """Deliver each result to ``on_result`` until ``stop`` is set.

    With a ``group_id`` the position is committed once each result was handled (a later follow
    resumes there); without one a private group reads from the beginning of the topic.
    ``consumer``: the stub broker's in tests.
    """
    serde = serde or clients.serde(settings)
    if consumer is None:
        gid = group_id or f"{settings.topic_prefix}follow-{uuid.uuid4().hex[:8]}"
        consumer = clients.consumer(settings.kafka, "results", gid)
    follower = _Follower(serde, on_result, on_ready)
    topics = [Topics(settings.topic_prefix).results]
    ConsumeLoop(follower, consumer, topics, commit=group_id is not None, commit_interval_s=1.0).run(stop)
