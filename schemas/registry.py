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
    "schema_text",
]

logger = logging.getLogger(__name__)

ParsedSchema = dict[str, Any]


@cache
def _schema_json(filename: str) -> str:
    return resources.files("schemas").joinpath(f"avro/{filename}").read_text()


def schema_text(filename: str) -> str:
    """A packaged ``.avsc`` file as written: docs, defaults and logical types included (what a
    Schema Registry must hold; the parsing canonical form drops them)."""
    return _schema_json(filename)


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


def _plain(value: Any) -> Any:
    """A parsed schema without fastavro's bookkeeping keys (``__fastavro_parsed``, …)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class ConfluentSchemaRegistry:
    """A Confluent Schema Registry through confluent-kafka's client (``mock://`` URLs give its
    in-process registry). Serializers built on it are confluent-kafka's own ``AvroSerializer`` and
    ``AvroDeserializer`` (see ``schemas.serde``), registering the full ``.avsc`` text under
    record-name subjects.

    ``config`` passes any client setting through (``ssl.ca.location``, ``bearer.auth.*``, …)."""

    def __init__(
        self,
        url: str,
        basic_auth_user_info: str | None = None,
        *,
        config: dict[str, str] | None = None,
        auto_register_schemas: bool = True,
        use_latest_version: bool = False,
    ) -> None:
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise ConfigError(f"Schema Registry client unavailable: {exc}") from exc
        conf: dict[str, Any] = {"url": url, **(config or {})}
        if basic_auth_user_info:
            conf["basic.auth.user.info"] = basic_auth_user_info
        try:
            self.client = SchemaRegistryClient.new_client(conf)
        except Exception as exc:
            raise ConfigError(f"Schema Registry client for {url}: {exc}") from exc
        self.serializer_conf: dict[str, Any] = {
            "auto.register.schemas": auto_register_schemas,
            "use.latest.version": use_latest_version,
            "subject.name.strategy": record_subject_name_strategy,
        }
        self._schemas: dict[int, ParsedSchema] = {}

    def id_for(self, schema: ParsedSchema, subject: str) -> int:
        """The id of ``schema`` under ``subject`` (registered when auto-registration is on)."""
        from confluent_kafka.schema_registry import Schema

        text = json.dumps(_plain(schema))
        try:
            if self.serializer_conf["auto.register.schemas"]:
                return int(self.client.register_schema(subject, Schema(text, "AVRO")))
            found = self.client.lookup_schema(subject, Schema(text, "AVRO")).schema_id
            if found is None:
                raise SerializationError(DeadLetterReason.SCHEMA_MISMATCH, f"subject {subject}: schema not registered")
            return int(found)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(DeadLetterReason.SCHEMA_MISMATCH, f"subject {subject}: {exc}") from exc

    def schema_for(self, schema_id: int) -> ParsedSchema:
        if schema_id not in self._schemas:
            try:
                registered = self.client.get_schema(schema_id)
            except Exception as exc:
                raise SerializationError(DeadLetterReason.SCHEMA_MISMATCH, f"schema id {schema_id}: {exc}") from exc
            self._schemas[schema_id] = dict(parse_schema(json.loads(registered.schema_str or "{}")))
        return self._schemas[schema_id]
