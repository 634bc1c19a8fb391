"""The engine seam: a streaming engine the consumer keeps full (vLLM, or the named instant test double).

The consumer adds requests as slots free up, steps the engine, and takes each request's output as
soon as it finishes; it can abort a running request (cancellation, deadline, shutdown). This is
vLLM's own engine interface (``LLMEngine.add_request`` / ``step`` / ``abort_request``), so the
consumer drives the engine continuously instead of waiting for a batch's slowest request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.catalog import ModelEntry
from core.engines import engine_factory
from core.errors import EngineError
from core.settings import EngineSettings
from schemas import DeadLetterReason

__all__ = ["Engine", "EngineDied", "EngineOutput", "EngineRequest", "create_engine"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # Lower runs first, as in vLLM's priority scheduler (the consumer passes the aged rank).
    priority: int = 1
    # How many times this request already failed transiently (0 on its first run).
    attempt: int = 0
    stop: tuple[str, ...] = ()
    # OpenAI's response_format as JSON text: {"type": "json_object"} or {"type": "json_schema", ...}.
    response_format: str | None = None


@dataclass(frozen=True)
class EngineOutput:
    """A finished (or aborted, or refused) request: what it produced and the tokens it used."""

    request_id: str
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    # A per-request failure (vLLM run_batch style): the other requests are unaffected.
    error: str | None = None
    error_kind: DeadLetterReason | None = None


class EngineDied(EngineError):
    """The engine failed as a whole (engine core died, out of memory): every request in it is lost
    and the engine must be restarted before it takes new ones."""


class Engine(Protocol):
    name: str

    @property
    def max_inflight(self) -> int:
        """How many requests the engine runs at once (vLLM's ``max_num_seqs``)."""
        ...

    def add(self, request: EngineRequest) -> EngineOutput | None:
        """Start a request. Returns an output with an error if the request cannot run at all
        (for example its prompt overflows the context); ``None`` when it was accepted."""
        ...

    def step(self) -> list[EngineOutput]:
        """Advance every running request by one engine step; returns those that finished.
        Raises :class:`EngineDied` when the engine failed as a whole."""
        ...

    def abort(self, request_ids: Sequence[str]) -> list[EngineOutput]:
        """Stop running requests; their outputs so far (``finish_reason="abort"``), for billing."""
        ...

    def has_unfinished(self) -> bool: ...

    def restart(self) -> None:
        """A fresh engine after :class:`EngineDied`, with nothing in flight."""
        ...

    def close(self) -> None: ...


def create_engine(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> Engine:
    """The engine ``settings.kind`` names in the engine registry (``core.engines``)."""
    engine: Engine = engine_factory(settings.kind)(settings, model, data_dir)
    return engine
