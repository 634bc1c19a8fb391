"""The engine seam: one protocol in front of vLLM (or the named instant test double)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sluice.catalog import ModelEntry
from sluice.engines import engine_factory
from sluice.settings import EngineSettings

__all__ = ["Engine", "EngineOutput", "EngineRequest", "create_engine", "run_isolating"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # Lower runs first, as in vLLM's priority scheduler.
    priority: int = 1
    # How many times this request already failed transiently (0 on its first run).
    attempt: int = 0


@dataclass(frozen=True)
class EngineOutput:
    request_id: str
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    # A per-request failure (vLLM run_batch style): the rest of the batch is unaffected.
    error: str | None = None
    error_kind: str | None = field(default=None)


class Engine(Protocol):
    name: str

    def generate(self, batch: Sequence[EngineRequest]) -> list[EngineOutput]:
        """One output per request, same order. Raises only when the whole batch failed."""
        ...

    def close(self) -> None: ...


def run_isolating(engine: Engine, batch: Sequence[EngineRequest]) -> list[EngineOutput]:
    """Run a batch; if the engine fails it, bisect until the failing request(s) are isolated.

    A poison request costs O(log n) extra engine calls instead of failing its whole batch.
    """
    if not batch:
        return []
    try:
        return engine.generate(batch)
    except Exception as exc:
        if len(batch) == 1:
            logger.error("engine failed request %s: %r", batch[0].request_id, exc)
            return [EngineOutput(request_id=batch[0].request_id, error=repr(exc), error_kind="engine_error")]
        logger.warning("engine failed a batch of %d (%r); bisecting", len(batch), exc)
        mid = len(batch) // 2
        return run_isolating(engine, batch[:mid]) + run_isolating(engine, batch[mid:])


def create_engine(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> Engine:
    """The engine ``settings.kind`` names in the engine registry (``sluice.engines``)."""
    engine: Engine = engine_factory(settings.kind)(settings, model, data_dir)
    return engine
