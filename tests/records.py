"""One record of each wire type, with optional fields set: for round trips through any serde."""

from __future__ import annotations

from datetime import datetime

from schemas import (
    AvroRecord,
    BatchStatus,
    ChatMessage,
    CostMetric,
    DeadLetter,
    DeadLetterReason,
    InferenceRequest,
    InferenceResult,
    RequestStatus,
)

__all__ = ["one_of_each", "request"]


def request(t0: datetime, **kw: object) -> InferenceRequest:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "tenant": "acme",
        "priority": "high",
        "messages": [ChatMessage(role="user", content="hi")],
        "created_at": t0,
    }
    fields.update(kw)
    return InferenceRequest.model_validate(fields)


def one_of_each(t0: datetime) -> list[AvroRecord]:
    return [
        request(t0, deadline=t0, metadata={"k": "v"}, seed=7),
        request(
            t0,
            batch_id="batch_1",
            custom_id="line-1",
            stop=["\n\n"],
            response_format='{"type":"json_object"}',
            reply_to="team-a.results",
            webhook_url="https://hooks.example.com/sluice",
        ),
        BatchStatus(
            batch_id="batch_1",
            tenant="acme",
            state="in_progress",
            input_file_id="file-1",
            total=3,
            completed=1,
            metadata={"k": "v"},
            created_at=t0,
            expires_at=t0,
            updated_at=t0,
            in_progress_at=t0,
        ),
        InferenceResult(
            request_id="r",
            tenant="t",
            priority="low",
            model="m",
            status="succeeded",
            output_text="ok",
            created_at=t0,
            started_at=t0,
            completed_at=t0,
        ),
        DeadLetter(
            reason=DeadLetterReason.UNKNOWN_MODEL,
            error="e",
            source_topic="s",
            source_partition=1,
            source_offset=2,
            original=b"\x00\x01",
            stage="processor",
            created_at=t0,
        ),
        CostMetric(
            request_id="r",
            tenant="t",
            priority="low",
            model="m",
            input_tokens=1,
            output_tokens=2,
            queue_wait_ms=3,
            engine_ms=4.5,
            latency_ms=6,
            cost_usd=0.1,
            baseline_cost_usd=0.2,
            created_at=t0,
        ),
        RequestStatus(request_id="r", state="routed", at=t0, model="m"),
    ]
