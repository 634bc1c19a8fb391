"""Hand-framed Avro events for tests that must bypass pydantic validation (unit and integration)."""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_writer

from schemas.registry import load_schema

__all__ = ["frame_request_dict"]


def frame_request_dict(record: dict[str, Any], schema_id: int = 1) -> bytes:
    """Encode a request dict with the v1 writer schema, bypassing pydantic validation."""
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    schemaless_writer(buf, load_schema("inference_request.v1.avsc"), record)
    return buf.getvalue()
