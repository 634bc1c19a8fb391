"""The engine registry: engine name -> factory, the one list that settings and the CLI accept.

Every engine, the built-in ``vllm`` and ``instant`` ones included, is an entry point of the
``sluice.engines`` group (pyproject.toml), with the factory signature
``(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> Engine``. Factories load only
when a GPU consumer starts one, so naming an engine costs nothing (vLLM takes seconds to import).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from core.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "engine_factory", "engine_names"]

ENTRY_POINT_GROUP = "sluice.engines"


def _registry() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def engine_names() -> list[str]:
    return sorted(_registry())


def engine_factory(name: str) -> Callable[..., Any]:
    try:
        target = _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}") from None
    factory: Callable[..., Any] = target.load()
    return factory
