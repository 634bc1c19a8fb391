"""Schema ids for the Confluent wire format: a local id table, or a Confluent Schema Registry."""

from __future__ import annotations

import json
import logging
import threading
import zlib
from functools import cache
from importlib import resources
from typing import Any, Protocol

from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import ConfigError, SerializationError
from schemas.vocabulary import DeadLetterReason

__all__ = [
    "ConfluentSchemaRegistry",
    "LocalSchemaRegistry",
    "SchemaRegistry",
    "load_schema",
    "schema_fullname",
]

logger = logging.getLogger(__name__)

ParsedSchema = dict[str, Any]


@cache
def _schema_json(filename: str) -> str:
    return resources.files("schemas").joinpath(f"avro/{filename}").read_text()


def load_schema(filename: str) -> ParsedSchema:
    """A packaged ``.avsc`` file, parsed (fresh copy: fastavro mutates parsed schemas)."""
    return dict(parse_schema(json.loads(_schema_json(filename))))


def schema_fullname(schema: ParsedSchema) -> str:
    return str(schema["name"])


class SchemaRegistry(Protocol):
    def id_for(self, schema: ParsedSchema, subject: str) -> int: ...

    def schema_for(self, schema_id: int) -> ParsedSchema: ...


class LocalSchemaRegistry:
    """Ids from ``avro/registry.json``, identical in every process without any server.

    Schemas outside that table (e.g. a newer version built by an application) get an id derived
    from their canonical form, in a range the table never uses; they are only known to the
    process that registered them.
    """

    def __init__(self) -> None:
        manifest = json.loads(_schema_json("registry.json"))
        self._by_id: dict[int, ParsedSchema] = {}
        self._by_canonical: dict[str, int] = {}
        self._lock = threading.Lock()
        for sid, filename in manifest["schemas"].items():
            self._add(int(sid), load_schema(filename))

    def _add(self, schema_id: int, schema: ParsedSchema) -> None:
        self._by_id[schema_id] = schema
        self._by_canonical[to_parsing_canonical_form(schema)] = schema_id

    def id_for(self, schema: ParsedSchema, subject: str) -> int:
        canonical = to_parsing_canonical_form(schema)
        with self._lock:
            sid = self._by_canonical.get(canonical)
            if sid is None:
                sid = 0x40000000 | (zlib.crc32(canonical.encode()) & 0x3FFFFFFF)
                self._add(sid, schema)
                logger.info("registered local schema %s for %s as id %d", schema["name"], subject, sid)
            return sid

    def schema_for(self, schema_id: int) -> ParsedSchema:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise SerializationError(DeadLetterReason.SCHEMA_MISMATCH, f"unknown schema id {schema_id}") from None


class ConfluentSchemaRegistry:
    """Confluent Schema Registry over HTTP (confluent-kafka's client), with local caches."""

    def __init__(self, url: str, basic_auth_user_info: str | None = None) -> None:
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise ConfigError(f"Schema Registry client unavailable: {exc}") from exc
        conf: dict[str, str] = {"url": url}
        if basic_auth_user_info:
            conf["basic.auth.user.info"] = basic_auth_user_info
        self._client = SchemaRegistryClient(conf)
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, ParsedSchema] = {}

    def id_for(self, schema: ParsedSchema, subject: str) -> int:
        from confluent_kafka.schema_registry import Schema

        canonical = to_parsing_canonical_form(schema)
        key = (subject, canonical)
        if key not in self._ids:
            self._ids[key] = self._client.register_schema(subject, Schema(canonical, "AVRO"))
        return self._ids[key]

    def schema_for(self, schema_id: int) -> ParsedSchema:
        if schema_id not in self._schemas:
            try:
                registered = self._client.get_schema(schema_id)
            except Exception as exc:
                raise SerializationError(DeadLetterReason.SCHEMA_MISMATCH, f"schema id {schema_id}: {exc}") from exc
            self._schemas[schema_id] = dict(parse_schema(json.loads(registered.schema_str or "{}")))
        return self._schemas[schema_id]
