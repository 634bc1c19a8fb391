"""What the gateway refuses before it publishes anything, each with a clear 4xx.

The limits come from what the pipeline can carry. A request becomes one Kafka record, and
Apache Kafka's default ``message.max.bytes`` is 1 MiB (1,048,588 bytes), so a JSON body is
refused at ``gateway.max_body_bytes`` (1,000,000 by default: room for the record's headers and
the Avro framing; raise both together). Nesting deeper than ``MAX_DEPTH`` is refused before it
is parsed (no recursion blow-up), text must be valid Unicode that encodes to UTF-8 (a lone
surrogate cannot be written to the wire), and metadata follows OpenAI's rules (16 pairs, keys of
at most 64 characters, values of at most 512).
"""

from __future__ import annotations

import json
from typing import Any

from core.errors import SluiceError

__all__ = [
    "MAX_DEPTH",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "BodyRefused",
    "check_metadata",
    "parse_json_body",
]

MAX_DEPTH = 32
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class BodyRefused(SluiceError):
    """A request body the gateway will not carry: ``status`` 400 or 413, OpenAI's ``code``."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _depth(raw: bytes) -> int:
    """The deepest nesting of objects and arrays, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _check_text(value: Any, path: str = "body") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BodyRefused(400, f"{path} is not valid Unicode text ({exc.reason})", "invalid_text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


def parse_json_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object in ``raw``, or :class:`BodyRefused` saying why not."""
    if len(raw) > max_bytes:
        raise BodyRefused(413, f"the request body is larger than {max_bytes} bytes", "request_too_large")
    if _depth(raw) > MAX_DEPTH:
        raise BodyRefused(400, f"the body nests deeper than {MAX_DEPTH} levels", "invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BodyRefused(400, f"the body is not JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise BodyRefused(400, "the body must be a JSON object", "invalid_json")
    _check_text(body)
    return body


def check_metadata(metadata: Any) -> dict[str, str]:
    """OpenAI's metadata rules; returns the mapping."""
    strings = isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    if not strings:
        raise BodyRefused(400, "metadata must map strings to strings", "invalid_metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise BodyRefused(400, f"metadata has more than {MAX_METADATA_PAIRS} pairs", "invalid_metadata")
    for k, v in metadata.items():
        if len(k) > MAX_METADATA_KEY:
            raise BodyRefused(400, f"metadata key {k[:20]!r}… is longer than {MAX_METADATA_KEY}", "invalid_metadata")
        if len(v) > MAX_METADATA_VALUE:
            raise BodyRefused(
                400, f"metadata value of {k!r} is longer than {MAX_METADATA_VALUE} characters", "invalid_metadata"
            )
    return dict(metadata)
