"""The engine registry: engine name -> factory, the one list that settings and the CLI accept.

Factories are named by import path and loaded only when a GPU consumer starts one, so naming an
engine costs nothing (vLLM takes seconds to import). Other packages add engines through the
``sluice.engines`` entry-point group, with the factory signature
``(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> Engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from sluice.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "engine_factory", "engine_names"]

ENTRY_POINT_GROUP = "sluice.engines"

_BUILTIN: dict[str, str] = {
    "vllm": "gpu_consumers.vllm_engine:create",
    # TEST DOUBLE: answers instantly with an echo; for plumbing tests and overhead benchmarks.
    "instant": "gpu_consumers.instant_engine:create",
}


def _registry() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **_BUILTIN}


def engine_names() -> list[str]:
    return sorted(_registry())


def engine_factory(name: str) -> Callable[..., Any]:
    try:
        target = _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}") from None
    module, _, attr = target.partition(":")
    factory: Callable[..., Any] = getattr(import_module(module), attr)
    return factory
