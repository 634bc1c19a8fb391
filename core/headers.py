"""Kafka headers that travel with a request from hop to hop: W3C trace context (``traceparent``,
``tracestate``), the tenant and the correlation id. Every stage copies these from the message it
handles to the messages it writes about that request (routed, deduplicated, retried, handed back,
answered), so a trace or a tenant's request can be followed across the pipeline."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CARRIED", "Headers", "carried", "header", "new_traceparent", "valid_traceparent"]

Headers = list[tuple[str, bytes]]

CARRIED = ("traceparent", "tracestate", "tenant", "correlation_id")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def new_traceparent() -> str:
    """A new root trace context (version 00, sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid_traceparent(value: str) -> bool:
    return bool(_TRACEPARENT.match(value)) and not value.startswith("ff")


def _pairs(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> Iterable[tuple[str, Any]]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def carried(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> Headers:
    """The carried headers among ``headers`` (first of each name), values as bytes."""
    out: Headers = []
    seen: set[str] = set()
    for name, value in _pairs(headers):
        if name in CARRIED and name not in seen and value is not None:
            seen.add(name)
            out.append((name, value if isinstance(value, bytes) else str(value).encode()))
    return out


def header(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None, name: str) -> str | None:
    for key, value in _pairs(headers):
        if key == name and value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
