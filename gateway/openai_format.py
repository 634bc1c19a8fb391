"""OpenAI's shapes: a chat-completions body (a batch line's ``body`` or an async request) becomes
an :class:`InferenceRequest`, and a batch becomes OpenAI's ``batch`` object. (Results become
OpenAI's shapes in ``analytics.results``.)

Parsing follows vLLM's ``run_batch.py``: a bad line is a per-line error, never a failed batch.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas import BatchState, BatchStatus, Endpoint, InferenceRequest, Priority
from schemas.errors import validation_summary

__all__ = [
    "LineError",
    "batch_object",
    "parse_batch_line",
    "request_from_body",
    "request_from_responses_body",
    "unix",
]

# The body fields Sluice honours; anything else is refused by name, so a caller never believes a
# parameter took effect when it did not.
_BODY_FIELDS = {
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "response_format",
    "stream",
    "metadata",
    "user",
}
# Sluice's own fields, accepted on the async endpoint (a batch sets them per batch).
_ASYNC_FIELDS = {"priority", "webhook_url", "cache", "reply_to", "deadline"}


class LineError(ValueError):
    """A batch line or request body Sluice cannot run; ``code`` is OpenAI-style."""

    def __init__(self, message: str, code: str = "invalid_request", *, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError(f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise LineError(f"messages[{i}].content must be a string or a list of text parts")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise LineError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise LineError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise LineError(f"messages[{i}].role {role!r} is not one of system, user, assistant")
        out.append({"role": role, "content": _content(m, i)})
    return out


def _response_format(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise LineError("response_format.type must be text, json_object or json_schema")
    if raw["type"] == "text":
        return None
    if raw["type"] == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise LineError("response_format.json_schema.schema must be a JSON schema object")
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def _stop(raw: Any) -> list[str]:
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise LineError("stop must be a string or a list of up to 4 non-empty strings")
    return list(stops)


def request_from_body(
    body: Any,
    *,
    tenant: str,
    request_id: str | None = None,
    priority: Priority | str = Priority.NORMAL,
    allow_sluice_fields: bool = False,
    **fields: Any,
) -> InferenceRequest:
    """The request a chat-completions ``body`` asks for; :class:`LineError` names what is wrong.

    ``tenant`` always comes from the caller's API key, never from the body."""
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object")
    allowed = _BODY_FIELDS | (_ASYNC_FIELDS if allow_sluice_fields else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise LineError(f"unsupported field(s) {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}")
    if body.get("n", 1) != 1:
        raise LineError("n must be 1 (one completion per request)")
    if body.get("stream"):
        raise LineError("stream is not supported: results are delivered asynchronously")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise LineError("give max_tokens or max_completion_tokens, not both")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise LineError("model must be a string")
    values: dict[str, Any] = {
        "tenant": tenant,
        "priority": body.get("priority", priority) if allow_sluice_fields else priority,
        "messages": _messages(body.get("messages")),
        "model": None if model in (None, "", "auto") else model,
        "stop": _stop(body.get("stop")),
        "response_format": _response_format(body.get("response_format")),
        **fields,
    }
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        values["max_tokens"] = tokens
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            values[name] = body[name]
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise LineError("metadata must map strings to strings")
        values["metadata"] = {**values.get("metadata", {}), **metadata}
    if allow_sluice_fields:
        for name in ("webhook_url", "cache", "reply_to", "deadline"):
            if body.get(name) is not None:
                values[name] = body[name]
    if request_id is not None:
        values["request_id"] = request_id
    try:
        return InferenceRequest.model_validate(values)
    except ValidationError as exc:
        raise LineError(validation_summary(exc)) from exc


# The Responses API fields Sluice honours (text in, text out); others are refused by name.
_RESPONSES_FIELDS = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "metadata",
    "user",
    "store",
}


def _input_messages(raw: Any, instructions: Any) -> list[dict[str, Any]]:
    """Responses ``input`` (a string, or a list of messages whose content is a string or
    ``input_text`` parts) and ``instructions`` as chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise LineError("instructions must be a string")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise LineError("input must be a string or a non-empty list of messages")
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise LineError(f"input[{i}]: only messages are supported (no tool calls or other items)")
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                    raise LineError(f"input[{i}].content: only text parts are supported")
                parts.append({"type": "text", "text": part["text"]})
            content = parts
        messages.append({"role": item.get("role"), "content": content})
    return messages


def _text_format(raw: Any) -> dict[str, Any] | None:
    """Responses ``text.format`` as a chat ``response_format``."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"format"}:
        raise LineError("text supports format only")
    fmt = raw.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise LineError("text.format must be an object")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def request_from_responses_body(
    body: Any, *, tenant: str, request_id: str | None = None, priority: Priority | str = Priority.NORMAL, **fields: Any
) -> InferenceRequest:
    """The request a Responses API ``body`` asks for (text input and output)."""
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object")
    unknown = sorted(set(body) - _RESPONSES_FIELDS)
    if unknown:
        raise LineError(f"unsupported field(s) {', '.join(unknown)}; supported: {', '.join(sorted(_RESPONSES_FIELDS))}")
    if body.get("store") is False:
        raise LineError("store=false is not supported: Sluice keeps every result (see its retention settings)")
    chat: dict[str, Any] = {
        "messages": _input_messages(body.get("input"), body.get("instructions")),
        "response_format": _text_format(body.get("text")),
    }
    for name in ("model", "temperature", "top_p", "metadata", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    return request_from_body(chat, tenant=tenant, request_id=request_id, priority=priority, **fields)


def parse_batch_line(
    line: bytes,
    line_no: int,
    *,
    tenant: str,
    request_id: str,
    endpoint: Endpoint = Endpoint.CHAT_COMPLETIONS,
    **fields: Any,
) -> tuple[str | None, InferenceRequest]:
    """``(custom_id, request)`` for one line of an OpenAI batch input file (``line_no`` from 1).

    Raises :class:`LineError` carrying the ``custom_id`` when it could be read."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineError(f"line {line_no}: not a JSON object: {exc}") from exc
    if not isinstance(obj, dict):
        raise LineError(f"line {line_no}: not a JSON object")
    custom_id = obj.get("custom_id")
    try:
        if not isinstance(custom_id, str) or not custom_id:
            raise LineError("custom_id must be a non-empty string")
        unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise LineError(f"unsupported field(s) {', '.join(unknown)}")
        if obj.get("method", "POST") != "POST":
            raise LineError("method must be POST")
        if obj.get("url") != endpoint:
            raise LineError(f"url must be {endpoint}, the batch's endpoint")
        parse = request_from_responses_body if endpoint is Endpoint.RESPONSES else request_from_body
        request = parse(obj.get("body"), tenant=tenant, request_id=request_id, custom_id=custom_id, **fields)
    except LineError as exc:
        cid = custom_id if isinstance(custom_id, str) else None
        raise LineError(f"line {line_no}: {exc}", exc.code, custom_id=cid) from exc
    return custom_id, request


def unix(ts: datetime | None) -> int | None:
    return int(ts.timestamp()) if ts is not None else None


def batch_object(b: BatchStatus) -> dict[str, Any]:
    """OpenAI's ``batch`` object."""
    ended = unix(b.ended_at)
    return {
        "id": b.batch_id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": (
            {"object": "list", "data": [{"code": "invalid_file", "message": b.error, "param": None, "line": None}]}
            if b.error
            else None
        ),
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.state.value,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": unix(b.created_at),
        "in_progress_at": unix(b.in_progress_at),
        "expires_at": unix(b.expires_at),
        "finalizing_at": unix(b.finalizing_at),
        "completed_at": ended if b.state is BatchState.COMPLETED else None,
        "failed_at": ended if b.state is BatchState.FAILED else None,
        "expired_at": ended if b.state is BatchState.EXPIRED else None,
        "cancelling_at": unix(b.cancelling_at),
        "cancelled_at": ended if b.state is BatchState.CANCELLED else None,
        # at_risk (Sluice's): lines whose deadline, the end of the window, may be missed.
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed, "at_risk": b.at_risk},
        "metadata": b.metadata or None,
        "priority": b.priority.value,
    }
