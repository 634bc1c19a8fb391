"""The wire vocabulary and the pydantic mirrors agree with the ``.avsc`` files: enum symbols,
field types and defaults, not only field names."""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from enum import StrEnum
from importlib import resources
from typing import Any

import pytest
from pydantic import BaseModel

from schemas import (
    BatchState,
    BatchStatus,
    CacheKind,
    ChatMessage,
    CostMetric,
    DeadLetter,
    DeadLetterReason,
    InferenceRequest,
    InferenceResult,
    Priority,
    RequestState,
    RequestStatus,
    ResultStatus,
    Route,
    Stage,
)


def _avsc(filename: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(resources.files("schemas").joinpath(f"avro/{filename}").read_text())
    return raw


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def test_dead_letter_reason_is_the_avro_enum_symbol_for_symbol() -> None:
    avro = _field(_avsc(DeadLetter.schema_file), "reason")["type"]
    assert avro["type"] == "enum"
    assert [r.value for r in DeadLetterReason] == avro["symbols"]
    assert DeadLetterReason(avro["default"]) is DeadLetterReason.UNKNOWN


@pytest.mark.parametrize(
    ("record", "field", "vocabulary"),
    [
        (InferenceRequest, "priority", Priority),
        (InferenceResult, "status", ResultStatus),
        (RequestStatus, "state", RequestState),
        (DeadLetter, "stage", Stage),
        (BatchStatus, "state", BatchState),
        (InferenceResult, "cache_kind", CacheKind),
        (CostMetric, "cache_kind", CacheKind),
    ],
)
def test_string_vocabularies_are_the_symbols_the_avsc_documents(
    record: type[Any], field: str, vocabulary: type[StrEnum]
) -> None:
    avro = _field(_avsc(record.schema_file), field)
    assert avro["type"] in ("string", ["null", "string"])
    assert sorted(s.strip() for s in avro["doc"].split("|")) == sorted(v.value for v in vocabulary)


def test_priority_ranks_follow_the_declared_order() -> None:
    assert [p.rank for p in Priority] == [0, 1, 2]
    assert [Priority.by_rank(r) for r in (-1, 0, 1, 2, 9)] == [
        Priority.HIGH,
        Priority.HIGH,
        Priority.NORMAL,
        Priority.LOW,
        Priority.LOW,
    ]


def _python_type(avro: Any) -> tuple[type, ...]:
    """The Python types a field of this Avro type may be declared as."""
    if isinstance(avro, list):
        return tuple(t for branch in avro if branch != "null" for t in _python_type(branch))
    if isinstance(avro, dict):
        if avro.get("logicalType") == "timestamp-millis":
            return (datetime,)
        complex_types: dict[str, tuple[type, ...]] = {
            "enum": (StrEnum,),
            "array": (list,),
            "map": (dict,),
            "record": (BaseModel,),
        }
        return complex_types.get(avro["type"]) or _python_type(avro["type"])
    return {
        "string": (str,),
        "int": (int,),
        "long": (int,),
        "double": (float,),
        "boolean": (bool,),
        "bytes": (bytes,),
    }[avro]


def _declared(annotation: Any) -> tuple[list[type], bool]:
    """(the non-None types of a pydantic annotation, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [t for a in args if a is not type(None) for t in _declared(a)[0]]
        return inner, type(None) in args
    if origin is typing.Literal:
        return [type(typing.get_args(annotation)[0])], False
    return [origin or annotation], False


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (InferenceRequest, _avsc(InferenceRequest.schema_file)),
        (InferenceResult, _avsc(InferenceResult.schema_file)),
        (DeadLetter, _avsc(DeadLetter.schema_file)),
        (CostMetric, _avsc(CostMetric.schema_file)),
        (RequestStatus, _avsc(RequestStatus.schema_file)),
        (BatchStatus, _avsc(BatchStatus.schema_file)),
        (ChatMessage, _avsc(InferenceRequest.schema_file)["fields"][3]["type"]["items"]),
        (Route, _field(_avsc(InferenceRequest.schema_file), "route")["type"][1]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_models_mirror_the_avsc_types_and_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    assert [f["name"] for f in schema["fields"]] == list(model.model_fields)
    for avro in schema["fields"]:
        field = model.model_fields[avro["name"]]
        declared, nullable = _declared(field.annotation)
        allowed = _python_type(avro["type"])
        where = f"{model.__name__}.{avro['name']}"
        assert all(issubclass(t, allowed) for t in declared), f"{where}: {declared} is not {allowed}"
        assert nullable == (isinstance(avro["type"], list) and "null" in avro["type"]), where
        if "default" in avro:
            default = field.get_default(call_default_factory=True)
            assert default == avro["default"], f"{where}: default {default!r} != {avro['default']!r}"
