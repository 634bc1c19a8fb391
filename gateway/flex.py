"""The synchronous tier: OpenAI's ``/v1/chat/completions`` and ``/v1/responses`` answered through
the whole pipeline (dedupe, cache, routing, priority, cost), the HTTP call waiting for the result.

Like OpenAI's Flex processing: ``service_tier`` picks the priority (``flex`` runs at low), a call
that would wait longer than its caller will (``X-Sluice-Max-Wait`` or the key's limit) is refused
at once with 429 ``resource_unavailable`` and ``Retry-After`` (nothing queued, nothing billed), and a
caller that hangs up cancels its request (aborted in the engine if running, billed for its tokens).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from analytics.results import chat_completion, error_code
from core.errors import SluiceError
from core.headers import valid_traceparent
from gateway.capacity import Capacity
from gateway.keys import KeyInfo
from gateway.waiting import ResultWaiter
from schemas import InferenceRequest, InferenceResult, Priority, ResultStatus, utcnow

__all__ = ["SyncCall", "Tier", "http_status", "sse_chat_chunks", "tier_of"]

logger = logging.getLogger(__name__)

# After the wait a call allows, how long the result of a request that expired in the pipeline may
# take to arrive before the call gives up on it.
_GRACE_S = 15.0
_CHECK_S = 0.5

# Failed results -> the HTTP status and code OpenAI answers a synchronous call with.
_STATUS = {
    "invalid_request": (400, "invalid_request"),
    "context_length_exceeded": (400, "context_length_exceeded"),
    "model_not_found": (404, "model_not_found"),
    # A synchronous request's deadline is its caller's wait.
    "batch_expired": (504, "timeout"),
    "batch_cancelled": (499, "cancelled"),
    "reply_to_refused": (400, "reply_to_refused"),
    "quota_exceeded": (429, "quota_exceeded"),
}


class Refused(SluiceError):
    """A synchronous call answered with an error before or instead of a result."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": str(self), "type": kind, "param": None, "code": self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


@dataclass(frozen=True)
class Tier:
    """The service tier a call asked for, as OpenAI echoes it, and the priority it runs at."""

    name: str
    priority: Priority


def tier_of(requested: Any, key: KeyInfo, tiers: dict[str, str]) -> Tier:
    name = "auto" if requested is None else requested
    mapping = {**tiers, **key.service_tiers}
    if not isinstance(name, str) or name not in mapping:
        raise Refused(400, f"service_tier must be one of {', '.join(sorted(mapping))}", "invalid_request")
    # OpenAI answers "default" for a request that asked for "auto".
    return Tier("default" if name == "auto" else name, Priority(mapping[name]))


def http_status(result: InferenceResult) -> tuple[int, str, str]:
    """(HTTP status, OpenAI-style code, message) for a failed result."""
    code, message = error_code(result.error)
    status, code = _STATUS.get(code, (500, code))
    return status, code, message


class SyncCall:
    """One synchronous request: admission (wait estimate), publish, wait, cancel on hang-up."""

    def __init__(
        self,
        *,
        waiter: ResultWaiter,
        capacity: Capacity,
        submit: Callable[[InferenceRequest, str | None], None],
        cancel: Callable[[str, str], None],
    ) -> None:
        self.waiter = waiter
        self.capacity = capacity
        self.submit = submit
        self.cancel = cancel

    def max_wait(self, request: Request, key: KeyInfo, default_s: float) -> float:
        limit = key.max_wait_s or default_s
        asked = request.headers.get("x-sluice-max-wait")
        if asked is None:
            return limit
        try:
            value = float(asked)
        except ValueError:
            raise Refused(400, "X-Sluice-Max-Wait must be a number of seconds", "invalid_request") from None
        if not value > 0 or math.isinf(value):
            raise Refused(400, "X-Sluice-Max-Wait must be a positive number of seconds", "invalid_request")
        return min(value, limit)

    def admit(self, req: InferenceRequest, max_wait_s: float) -> None:
        """Refuse now, with nothing queued, when the estimated wait exceeds what the caller allows."""
        estimate = self.capacity.estimated_wait(req.priority)
        if estimate is not None and estimate > max_wait_s:
            retry = max(1, min(3600, math.ceil(estimate - max_wait_s)))
            raise Refused(
                429,
                f"resource unavailable: the estimated wait at {req.priority} priority is {estimate:.0f}s, "
                f"longer than the {max_wait_s:.0f}s this call allows; retry later or with a longer X-Sluice-Max-Wait",
                "resource_unavailable",
                {"Retry-After": str(retry)},
            )

    def prepare(self, req: InferenceRequest, max_wait_s: float) -> InferenceRequest:
        """The request with a deadline no later than the caller's wait: a request nobody waits for
        any more expires in the pipeline instead of running."""
        deadline = utcnow() + timedelta(seconds=max_wait_s)
        if req.deadline is None or req.deadline > deadline:
            return req.model_copy(update={"deadline": deadline})
        return req

    async def start(self, req: InferenceRequest, traceparent: str | None) -> asyncio.Future[InferenceResult]:
        future = self.waiter.expect(req.request_id)
        self.capacity.in_flight[req.priority] = self.capacity.in_flight.get(req.priority, 0) + 1
        trace = traceparent if traceparent and valid_traceparent(traceparent) else None
        try:
            # Acknowledged by the broker before the call waits: a lost request never hangs a caller.
            await asyncio.to_thread(self.submit, req, trace)
        except BaseException:
            self.done(req)
            raise
        return future

    def done(self, req: InferenceRequest) -> None:
        self.waiter.forget(req.request_id)
        self.capacity.in_flight[req.priority] = max(0, self.capacity.in_flight.get(req.priority, 0) - 1)

    async def wait(
        self, request: Request, req: InferenceRequest, future: asyncio.Future[InferenceResult], max_wait_s: float
    ) -> InferenceResult | None:
        """The result, or None if the caller hung up (the request is then cancelled)."""
        give_up = time.monotonic() + max_wait_s + _GRACE_S
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=_CHECK_S)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    await asyncio.to_thread(self.cancel, req.request_id, "the caller disconnected")
                    return None
                if time.monotonic() > give_up:
                    await asyncio.to_thread(self.cancel, req.request_id, f"not answered in {max_wait_s:.0f}s")
                    raise Refused(504, f"no result within {max_wait_s:.0f}s; the request was cancelled", "timeout")
        except asyncio.CancelledError:
            # The server cancelled the call (a streaming caller hung up): cancel the request too.
            await asyncio.shield(asyncio.to_thread(self.cancel, req.request_id, "the caller disconnected"))
            raise
        finally:
            self.done(req)


def _chunk(result: InferenceResult, tier: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion.chunk",
        "created": int(result.completed_at.timestamp()),
        "model": result.model,
        "service_tier": tier,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def sse_chat_chunks(result: InferenceResult, tier: str, *, include_usage: bool) -> list[str]:
    """A finished result as OpenAI's chat-completion chunks (the whole text in one chunk), ending
    with ``[DONE]``; a failed result as an error event, which the ``openai`` client raises."""
    if result.status is not ResultStatus.SUCCEEDED:
        status, code, message = http_status(result)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return [_sse({"error": {"message": message, "type": kind, "param": None, "code": code}})]
    body = chat_completion(result)
    events = [
        _chunk(result, tier, {"role": "assistant", "content": result.output_text}, None),
        _chunk(result, tier, {}, result.finish_reason or "stop"),
    ]
    if include_usage:
        events.append({**_chunk(result, tier, {}, None), "choices": [], "usage": body["usage"]})
    return [*(_sse(e) for e in events), "data: [DONE]\n\n"]


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


async def stream_result(
    call: SyncCall,
    request: Request,
    req: InferenceRequest,
    future: asyncio.Future[InferenceResult],
    max_wait_s: float,
    render: Callable[[InferenceResult], list[str]],
) -> AsyncIterator[str]:
    try:
        result = await call.wait(request, req, future, max_wait_s)
    except Refused as exc:
        yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}})
        return
    if result is not None:
        for event in render(result):
            yield event


def streaming(events: AsyncIterator[str], request_id: str) -> StreamingResponse:
    headers = {"x-request-id": request_id, "Cache-Control": "no-cache"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
