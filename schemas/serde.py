"""Avro serializers in the Confluent wire format, following confluent-kafka's Serializer contract.

Frame: magic byte ``0x00``, 4-byte big-endian schema id, Avro binary (schemaless) body.
Subjects use the record-name strategy, since one record type travels on several topics.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Generic, TypeVar

from confluent_kafka.serialization import Deserializer, MessageField, SerializationContext, Serializer
from fastavro import schemaless_reader, schemaless_writer
from pydantic import ValidationError

from schemas.errors import SerializationError, validation_summary
from schemas.models import AvroRecord
from schemas.registry import (
    ConfluentSchemaRegistry,
    LocalSchemaRegistry,
    SchemaRegistry,
    load_schema,
    schema_fullname,
    schema_text,
)
from schemas.vocabulary import DeadLetterReason

__all__ = [
    "MAGIC_BYTE",
    "AvroDeserializer",
    "AvroSerializer",
    "RegistryAvroDeserializer",
    "RegistryAvroSerializer",
    "Serde",
    "peek_schema_id",
]

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")

R = TypeVar("R", bound=AvroRecord)


def peek_schema_id(data: bytes) -> int:
    if len(data) < _HEADER.size:
        raise SerializationError(
            DeadLetterReason.MALFORMED_EVENT, f"{len(data)} bytes is shorter than the 5-byte header"
        )
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise SerializationError(
            DeadLetterReason.MALFORMED_EVENT,
            f"magic byte {magic} is not the Confluent magic byte 0",
        )
    return int(schema_id)


class AvroSerializer(Serializer, Generic[R]):  # type: ignore[misc]
    def __init__(self, registry: SchemaRegistry, record_type: type[R]) -> None:
        self._schema = load_schema(record_type.schema_file)
        self._subject = schema_fullname(self._schema)
        self._schema_id = registry.id_for(self._schema, self._subject)
        self._header = _HEADER.pack(MAGIC_BYTE, self._schema_id)

    @property
    def schema_id(self) -> int:
        return self._schema_id

    def __call__(self, obj: R | None, ctx: SerializationContext | None = None) -> bytes | None:
        if obj is None:
            return None
        buf = io.BytesIO()
        buf.write(self._header)
        schemaless_writer(buf, self._schema, obj.to_avro())
        return buf.getvalue()


class AvroDeserializer(Deserializer, Generic[R]):  # type: ignore[misc]
    """Decodes with the writer's schema (by id) resolved to this reader's schema."""

    def __init__(self, registry: SchemaRegistry, record_type: type[R]) -> None:
        self._registry = registry
        self._type = record_type
        self._reader = load_schema(record_type.schema_file)
        self._name = schema_fullname(self._reader)

    def decode_dict(self, data: bytes) -> dict[str, Any]:
        schema_id = peek_schema_id(data)
        writer = self._registry.schema_for(schema_id)
        if schema_fullname(writer) != self._name:
            raise SerializationError(
                DeadLetterReason.SCHEMA_MISMATCH,
                f"schema id {schema_id} is {schema_fullname(writer)}, expected {self._name}",
            )
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            record = schemaless_reader(buf, writer, self._reader)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise SerializationError(DeadLetterReason.MALFORMED_EVENT, f"undecodable Avro body: {exc!r}") from exc
        if buf.tell() != len(data):
            raise SerializationError(
                DeadLetterReason.MALFORMED_EVENT,
                f"{len(data) - buf.tell()} trailing bytes after the Avro record",
            )
        if not isinstance(record, dict):
            raise SerializationError(DeadLetterReason.MALFORMED_EVENT, "record is not a map")
        return record

    def __call__(self, data: bytes | None, ctx: SerializationContext | None = None) -> R:
        if data is None:
            raise SerializationError(DeadLetterReason.MALFORMED_EVENT, "empty (null) value")
        record = self.decode_dict(data)
        try:
            return self._type.model_validate(record)
        except ValidationError as exc:
            raise SerializationError(DeadLetterReason.VALIDATION_ERROR, validation_summary(exc), record=record) from exc


class RegistryAvroSerializer(AvroSerializer[R]):
    """Registry mode: confluent-kafka's ``AvroSerializer`` with the full ``.avsc`` text, under the
    record-name subject, honouring ``auto.register.schemas`` and ``use.latest.version``."""

    def __init__(self, registry: ConfluentSchemaRegistry, record_type: type[R]) -> None:
        from confluent_kafka.schema_registry.avro import AvroSerializer as ConfluentAvroSerializer

        self._name = schema_fullname(load_schema(record_type.schema_file))
        self._inner = ConfluentAvroSerializer(
            registry.client, schema_text(record_type.schema_file), conf=registry.serializer_conf
        )

    @property
    def schema_id(self) -> int:
        raise NotImplementedError("registry mode: the id is known after the first record is written")

    def __call__(self, obj: R | None, ctx: SerializationContext | None = None) -> bytes | None:
        if obj is None:
            return None
        try:
            data = self._inner(obj.to_avro(), ctx or _CTX)
        except Exception as exc:
            raise SerializationError(
                DeadLetterReason.SCHEMA_MISMATCH, f"cannot serialize {self._name} with the Schema Registry: {exc}"
            ) from exc
        return bytes(data) if data is not None else None


class RegistryAvroDeserializer(AvroDeserializer[R]):
    """Registry mode: confluent-kafka's ``AvroDeserializer`` (the writer's schema fetched by id,
    resolved to this release's ``.avsc``), its errors mapped to the typed dead-letter reasons."""

    def __init__(self, registry: ConfluentSchemaRegistry, record_type: type[R]) -> None:
        from confluent_kafka.schema_registry.avro import AvroDeserializer as ConfluentAvroDeserializer

        super().__init__(registry, record_type)
        self._inner = ConfluentAvroDeserializer(registry.client, schema_text(record_type.schema_file))

    def decode_dict(self, data: bytes) -> dict[str, Any]:
        schema_id = peek_schema_id(data)
        writer = self._registry.schema_for(schema_id)  # SCHEMA_MISMATCH when the id is unknown
        if schema_fullname(writer) != self._name:
            raise SerializationError(
                DeadLetterReason.SCHEMA_MISMATCH,
                f"schema id {schema_id} is {schema_fullname(writer)}, expected {self._name}",
            )
        try:
            record = self._inner(data, _CTX)
        except Exception as exc:
            raise SerializationError(DeadLetterReason.MALFORMED_EVENT, f"undecodable Avro body: {exc!r}") from exc
        if not isinstance(record, dict):
            raise SerializationError(DeadLetterReason.MALFORMED_EVENT, "record is not a map")
        return record


# Record-name subjects do not depend on the topic; confluent-kafka still wants a context.
_CTX = SerializationContext("sluice", MessageField.VALUE)


class Serde:
    """Serializer/deserializer factory bound to one schema registry, with per-type caching."""

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self.registry: SchemaRegistry = registry or LocalSchemaRegistry()
        self._ser: dict[type[AvroRecord], AvroSerializer[Any]] = {}
        self._de: dict[type[AvroRecord], AvroDeserializer[Any]] = {}

    @classmethod
    def for_registry(
        cls,
        url: str | None = None,
        basic_auth_user_info: str | None = None,
        *,
        config: dict[str, str] | None = None,
        auto_register_schemas: bool = True,
        use_latest_version: bool = False,
    ) -> Serde:
        """A Confluent Schema Registry at ``url``, or the local id table when ``url`` is unset."""
        if url:
            return cls(
                ConfluentSchemaRegistry(
                    url,
                    basic_auth_user_info,
                    config=config,
                    auto_register_schemas=auto_register_schemas,
                    use_latest_version=use_latest_version,
                )
            )
        return cls(LocalSchemaRegistry())

    def serializer(self, record_type: type[R]) -> AvroSerializer[R]:
        if record_type not in self._ser:
            if isinstance(self.registry, ConfluentSchemaRegistry):
                self._ser[record_type] = RegistryAvroSerializer(self.registry, record_type)
            else:
                self._ser[record_type] = AvroSerializer(self.registry, record_type)
        return self._ser[record_type]

    def deserializer(self, record_type: type[R]) -> AvroDeserializer[R]:
        if record_type not in self._de:
            if isinstance(self.registry, ConfluentSchemaRegistry):
                self._de[record_type] = RegistryAvroDeserializer(self.registry, record_type)
            else:
                self._de[record_type] = AvroDeserializer(self.registry, record_type)
        return self._de[record_type]

    def encode(self, obj: AvroRecord) -> bytes:
        data = self.serializer(type(obj))(obj)
        assert data is not None
        return data

    def decode(self, record_type: type[R], data: bytes | None) -> R:
        return self.deserializer(record_type)(data)
