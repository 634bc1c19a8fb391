from __future__ import annotations

import io
import json
import struct
from datetime import UTC, datetime
from importlib import resources

import pytest
from fastavro import parse_schema, schemaless_reader
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DeadLetterReason, SerializationError
from schemas import (
    BatchStatus,
    CostMetric,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    LocalSchemaRegistry,
    QuotaEntry,
    RequestStatus,
    Serde,
)
from schemas.registry import load_schema
from schemas.serde import AvroDeserializer, AvroSerializer
from tests.records import one_of_each, request

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _request(**kw: object) -> InferenceRequest:
    return request(T0, **kw)


def test_round_trip_every_record_type() -> None:
    serde = Serde()
    for rec in one_of_each(T0):
        assert serde.decode(type(rec), serde.encode(rec)) == rec


def test_golden_bytes_confluent_wire_format() -> None:
    data = Serde().encode(_request())
    # magic byte 0, schema id 7 (big-endian, from avro/registry.json), then the Avro body.
    assert data[:5] == b"\x00\x00\x00\x00\x07"
    assert data.hex() == _V1_BODY.replace("0000000001", "0000000007", 1) + (
        "00"  # batch_id null
        "00"  # custom_id null
        "00"  # stop: empty array
        "00"  # response_format null
        "00"  # reply_to null
        "00"  # webhook_url null
    )


def test_events_written_under_an_earlier_schema_id_read_with_the_new_fields_defaulted() -> None:
    """Bytes exactly as the first release wrote them (id 1, before batch_id, custom_id, stop,
    response_format, reply_to and webhook_url existed) decode into today's record."""
    old = Serde().decode(InferenceRequest, bytes.fromhex(_V1_BODY))
    assert old == _request()
    assert (old.batch_id, old.custom_id, old.stop, old.response_format, old.reply_to, old.webhook_url) == (
        None,
        None,
        [],
        None,
        None,
        None,
    )


_V1_BODY = (
    "0000000001"
    "0a7265712d31"  # request_id "req-1" (zigzag length 5 -> 0x0a)
    "0861636d65"  # tenant "acme"
    "0868696768"  # priority "high"
    "02"  # messages: block of 1
    "0875736572"
    "046869"  # role "user", content "hi"
    "00"  # end of array
    "00"  # model: null branch
    "8004"  # max_tokens 256
    "0000000000000000"  # temperature 0.0
    "000000000000f03f"  # top_p 1.0
    "00"  # seed null
    "dcbccccaef66"  # created_at 1767323045678 ms, zigzag varint
    "00"
    "00"
    "00"  # deadline, correlation_id, idempotency_key: null
    "01"  # cache true
    "00"  # replay_of null
    "00"  # attempt 0
    "00"  # metadata: empty map
    "00"  # dedupe_key null
    "00"  # route null
)


def test_local_ids_are_stable_and_match_the_manifest() -> None:
    manifest = json.loads(resources.files("schemas").joinpath("avro/registry.json").read_text())
    reg = LocalSchemaRegistry()
    for sid, filename in manifest["schemas"].items():
        assert reg.id_for(load_schema(filename), "s") == int(sid)


def test_new_optional_field_keeps_old_readers_working() -> None:
    registry = LocalSchemaRegistry()
    v2 = json.loads(resources.files("schemas").joinpath("avro/inference_request.v1.avsc").read_text())
    v2["fields"].append({"name": "labels", "type": {"type": "array", "items": "string"}, "default": []})

    class RequestV2(InferenceRequest):
        labels: list[str] = []

    writer = AvroSerializer.__new__(AvroSerializer)

    writer._schema = dict(parse_schema(v2))
    writer._schema_id = registry.id_for(writer._schema, "io.sluice.v1.InferenceRequest")
    writer._header = struct.pack(">bI", 0, writer._schema_id)
    assert writer.schema_id not in (1, 2, 3, 4, 5)
    data = writer(RequestV2.model_validate({**_request().model_dump(), "labels": ["a", "b"]}))
    old = AvroDeserializer(registry, InferenceRequest)(data)
    assert old == _request()
    # And a new reader reads old data, filling the default.
    buf = io.BytesIO(Serde(registry).encode(_request())[5:])
    assert schemaless_reader(buf, load_schema("inference_request.v1.avsc"), writer._schema)["labels"] == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", DeadLetterReason.MALFORMED_EVENT),
        (b"\x00\x00", DeadLetterReason.MALFORMED_EVENT),
        (b"\x05\x00\x00\x00\x01xx", DeadLetterReason.MALFORMED_EVENT),
        (b"\x00\x00\x00\x03\x09xx", DeadLetterReason.SCHEMA_MISMATCH),
        (b"\x00\x00\x00\x00\x02", DeadLetterReason.SCHEMA_MISMATCH),
        (b"\x00\x00\x00\x00\x01\xff", DeadLetterReason.MALFORMED_EVENT),
    ],
)
def test_bad_bytes_raise_typed_errors(data: bytes, reason: DeadLetterReason) -> None:
    with pytest.raises(SerializationError) as err:
        Serde().decode(InferenceRequest, data)
    assert err.value.reason is reason


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(SerializationError) as err:
        Serde().decode(InferenceRequest, Serde().encode(_request()) + b"junk")
    assert err.value.reason is DeadLetterReason.MALFORMED_EVENT


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_serialization_errors(data: bytes) -> None:
    try:
        Serde().decode(InferenceRequest, data)
    except SerializationError as exc:
        assert exc.reason in DeadLetterReason


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_fuzz_valid_header_random_body(body: bytes) -> None:
    try:
        Serde().decode(InferenceRequest, b"\x00\x00\x00\x00\x01" + body)
    except SerializationError as exc:
        assert exc.reason in (DeadLetterReason.MALFORMED_EVENT, DeadLetterReason.VALIDATION_ERROR)


@pytest.mark.parametrize(
    "model", [InferenceRequest, InferenceResult, DeadLetter, CostMetric, RequestStatus, BatchStatus, QuotaEntry]
)
def test_pydantic_models_mirror_the_avro_schemas(model: type) -> None:
    schema = json.loads(resources.files("schemas").joinpath(f"avro/{model.schema_file}").read_text())
    assert [f["name"] for f in schema["fields"]] == list(model.model_fields)
