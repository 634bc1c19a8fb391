"""Hand-framed Avro events for tests that must bypass pydantic validation (unit and integration)."""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_writer

from schemas.registry import LocalSchemaRegistry, load_schema

__all__ = ["frame_request_dict"]


def frame_request_dict(record: dict[str, Any], schema_id: int | None = None) -> bytes:
    """Encode a request dict with today's request schema (under its local id unless another is
    given), bypassing pydantic validation."""
    schema = load_schema("inference_request.v1.avsc")
    sid = schema_id if schema_id is not None else LocalSchemaRegistry().id_for(schema, "InferenceRequest")
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, sid))
    schemaless_writer(buf, schema, record)
    return buf.getvalue()
