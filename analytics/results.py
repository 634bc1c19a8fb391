"""Follow the results topic, and render results as text or OpenAI batch JSONL."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable

from confluent_kafka import KafkaError

from schemas import InferenceResult, ResultStatus, Serde
from sluice import clients
from sluice.errors import SluiceError
from sluice.settings import Settings
from sluice.topics import Topics

__all__ = ["follow_results", "openai_batch_line"]


def openai_batch_line(r: InferenceResult) -> str:
    """One line of OpenAI Batch API output JSONL (``custom_id`` is the Sluice request id)."""
    if r.status is ResultStatus.SUCCEEDED:
        body = {
            "id": f"chatcmpl-{r.request_id}",
            "object": "chat.completion",
            "created": int(r.completed_at.timestamp()),
            "model": r.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.output_text},
                    "finish_reason": r.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            },
        }
        line = {
            "id": f"batch_req_{r.request_id}",
            "custom_id": r.request_id,
            "response": {"status_code": 200, "request_id": r.request_id, "body": body},
            "error": None,
        }
    else:
        code, _, message = (r.error or "engine_error: unknown").partition(": ")
        line = {
            "id": f"batch_req_{r.request_id}",
            "custom_id": r.request_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    return json.dumps(line)


def follow_results(
    settings: Settings,
    on_result: Callable[[InferenceResult], None],
    stop: threading.Event,
    *,
    group_id: str | None = None,
    serde: Serde | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Deliver each result to ``on_result`` until ``stop`` is set.

    With a ``group_id`` the position is committed (a later follow resumes); without one a
    private group reads from the beginning of the topic.
    """
    serde = serde or clients.serde(settings)
    gid = group_id or f"{settings.topic_prefix}follow-{uuid.uuid4().hex[:8]}"
    consumer = clients.consumer(settings.kafka, "results", gid, **{"enable.auto.commit": group_id is not None})
    consumer.subscribe(
        [Topics(settings.topic_prefix).results],
        on_assign=lambda c, p: on_ready() if on_ready else None,
    )
    try:
        while not stop.is_set():
            msg = consumer.poll(0.1)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise SluiceError(f"results consumer: {err}")
                continue
            on_result(serde.decode(InferenceResult, msg.value()))
            if group_id is not None:
                consumer.store_offsets(msg)
    finally:
        consumer.close()
