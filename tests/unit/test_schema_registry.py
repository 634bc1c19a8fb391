"""Registry mode against confluent-kafka's in-process registry (``mock://``): confluent-kafka's
own Avro serializers, the full ``.avsc`` text under record-name subjects, schema evolution through
the registry, and its errors as typed dead-letter reasons."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from confluent_kafka.schema_registry import Schema, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer as ConfluentAvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from core import clients
from core.settings import Settings
from schemas import (
    ChatMessage,
    DeadLetterReason,
    InferenceRequest,
    RequestStatus,
    Serde,
    SerializationError,
)
from schemas.registry import ConfluentSchemaRegistry, schema_text
from tests.records import one_of_each

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
SUBJECT = "io.sluice.v1.InferenceRequest"


def _url() -> str:
    return f"mock://{uuid.uuid4().hex}"


def _request() -> InferenceRequest:
    return InferenceRequest(
        request_id="r1", tenant="acme", messages=[ChatMessage(role="user", content="hi")], created_at=T0
    )


def test_mock_urls_work_through_the_settings() -> None:
    settings = Settings()
    settings = settings.evolve(schema_registry={"url": _url()})
    serde = clients.serde(settings)
    assert isinstance(serde.registry, ConfluentSchemaRegistry)
    assert serde.decode(InferenceRequest, serde.encode(_request())) == _request()


def test_every_record_type_round_trips_and_the_full_avsc_is_registered() -> None:
    serde = Serde.for_registry(_url())
    records = [_request(), *one_of_each(T0)]
    for rec in records:
        assert serde.decode(type(rec), serde.encode(rec)) == rec
    assert isinstance(serde.registry, ConfluentSchemaRegistry)
    registered = serde.registry.client.get_latest_version(SUBJECT).schema.schema_str
    # Not the parsing canonical form: tools reading the registry see defaults, docs, logical types.
    assert json.loads(registered) == json.loads(schema_text("inference_request.v1.avsc"))
    assert '"logicalType": "timestamp-millis"' in registered and '"default": null' in registered


def test_an_event_from_the_previous_schema_version_reads_with_defaults() -> None:
    url = _url()
    serde = Serde.for_registry(url)
    assert isinstance(serde.registry, ConfluentSchemaRegistry)
    client = serde.registry.client
    old_text = schema_text("history/inference_request.v1.1.avsc")
    old_writer = ConfluentAvroSerializer(client, old_text, conf={"subject.name.strategy": record_subject_name_strategy})
    old = _request().model_dump(exclude={"batch_id", "custom_id", "stop", "response_format", "reply_to", "webhook_url"})
    data = old_writer(old, SerializationContext("t", MessageField.VALUE))
    decoded = serde.decode(InferenceRequest, data)
    assert decoded == _request() and decoded.stop == [] and decoded.custom_id is None
    # Writing with this release registers a second version of the same subject.
    new_bytes = serde.encode(_request().model_copy(update={"custom_id": "line-1"}))
    assert sorted(client.get_versions(SUBJECT)) == [1, 2]
    assert new_bytes[1:5] != data[1:5]  # a different schema id
    assert serde.decode(InferenceRequest, new_bytes).custom_id == "line-1"


def test_without_auto_registration_a_missing_schema_is_a_typed_error() -> None:
    serde = Serde.for_registry(_url(), auto_register_schemas=False)
    with pytest.raises(SerializationError) as err:
        serde.encode(_request())
    assert err.value.reason is DeadLetterReason.SCHEMA_MISMATCH


def test_use_latest_version_writes_with_the_registered_schema() -> None:
    url = _url()
    writer = Serde.for_registry(url, auto_register_schemas=False, use_latest_version=True)
    assert isinstance(writer.registry, ConfluentSchemaRegistry)
    sid = writer.registry.client.register_schema(SUBJECT, Schema(schema_text("inference_request.v1.avsc"), "AVRO"))
    data = writer.encode(_request())
    assert int.from_bytes(data[1:5], "big") == sid


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00\x7f\xff" + b"\x00" * 10, DeadLetterReason.SCHEMA_MISMATCH),
        (b"\x01\x00\x00\x00\x01", DeadLetterReason.MALFORMED_EVENT),
        (b"\x00", DeadLetterReason.MALFORMED_EVENT),
    ],
)
def test_registry_errors_map_to_typed_reasons(data: bytes, reason: DeadLetterReason) -> None:
    serde = Serde.for_registry(_url())
    with pytest.raises(SerializationError) as err:
        serde.decode(InferenceRequest, data)
    assert err.value.reason is reason


def test_a_corrupt_body_under_a_known_id_is_malformed() -> None:
    serde = Serde.for_registry(_url())
    good = serde.encode(_request())
    with pytest.raises(SerializationError) as err:
        serde.decode(InferenceRequest, good[:5] + b"\xff\xff\xff")
    assert err.value.reason is DeadLetterReason.MALFORMED_EVENT


def test_another_record_type_under_its_id_is_a_schema_mismatch() -> None:
    serde = Serde.for_registry(_url())
    status = serde.encode(RequestStatus(request_id="r", state="queued", at=T0))
    with pytest.raises(SerializationError) as err:
        serde.decode(InferenceRequest, status)
    assert err.value.reason is DeadLetterReason.SCHEMA_MISMATCH
