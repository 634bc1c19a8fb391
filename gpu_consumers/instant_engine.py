"""TEST DOUBLE: an instant streaming engine for plumbing tests and overhead benchmarks. Not an LLM.

It answers with a deterministic echo so tests can check routing, admission, offsets and sinks
without loading a model. Like a real engine it runs many requests at once and emits one token per
running request per step, with a simulated time per step (``instant_token_seconds``), so requests
with different ``max_tokens`` finish at different times. Like vLLM's priority scheduler it runs at
most ``max_inflight`` requests; the rest wait, lowest priority value first, and a waiting request
never displaces a running one (vLLM preempts only under KV-cache pressure). A prompt containing ``POISON_PILL`` makes
every step fail while it runs, as a request that crashes a real engine would; one containing
``FLAKY`` does so on its first attempt only, as a transient failure would; one containing
``PROCESS_KILLER`` ends the whole process at once (exit code 137), as a request that makes a
real engine segfault or run out of memory would. The real engine path is
``vllm_engine.VLLMEngine``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.catalog import ModelEntry
from core.settings import EngineSettings
from gpu_consumers.engine import EngineDied, EngineOutput, EngineRequest
from schemas import DeadLetterReason

__all__ = ["FLAKY", "POISON_PILL", "PROCESS_KILLER", "InstantTestEngine", "create"]

POISON_PILL = "POISON_PILL"
FLAKY = "FLAKY"
PROCESS_KILLER = "PROCESS_KILLER"


@dataclass
class _Running:
    request: EngineRequest
    words: list[str]
    prompt_tokens: int
    generated: int = 0

    def output(self, finish_reason: str) -> EngineOutput:
        text = " ".join(self.words[i % len(self.words)] for i in range(self.generated)) if self.words else ""
        return EngineOutput(
            request_id=self.request.request_id,
            text=f"echo: {text}",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.generated,
            finish_reason=finish_reason,
        )


class InstantTestEngine:
    def __init__(
        self, name: str, *, token_seconds: float = 0.0, max_model_len: int = 1024, max_inflight: int = 256
    ) -> None:
        self.name = name
        self.token_seconds = token_seconds
        self.max_model_len = max_model_len
        self._max_inflight = max_inflight
        self._running: dict[str, _Running] = {}
        self._waiting: dict[str, tuple[int, int, _Running]] = {}  # (priority, arrival, request)
        self._arrivals = 0
        self._dead = False
        self.steps = 0
        self.restarts = 0
        # The most concurrent requests seen in one step, for tests.
        self.peak_running = 0

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    def add(self, request: EngineRequest) -> EngineOutput | None:
        if self._dead:
            raise EngineDied("instant engine: add after the engine died (restart it first)")
        words = " ".join(m["content"] for m in request.messages).split()
        prompt_tokens = len(words) + 4 * len(request.messages)
        if prompt_tokens + request.max_tokens > self.max_model_len:
            return EngineOutput(
                request_id=request.request_id,
                prompt_tokens=prompt_tokens,
                error=f"prompt of {prompt_tokens} tokens + max_tokens {request.max_tokens} "
                f"exceeds the {self.max_model_len}-token context",
                error_kind=DeadLetterReason.CONTEXT_OVERFLOW,
            )
        self._arrivals += 1
        self._waiting[request.request_id] = (request.priority, self._arrivals, _Running(request, words, prompt_tokens))
        return None

    def _schedule(self) -> None:
        free = self._max_inflight - len(self._running)
        if free <= 0 or not self._waiting:
            return
        for rid in sorted(self._waiting, key=lambda r: self._waiting[r][:2])[:free]:
            self._running[rid] = self._waiting.pop(rid)[2]

    def step(self) -> list[EngineOutput]:
        self._schedule()
        if not self._running:
            return []
        for r in self._running.values():
            content = " ".join(m["content"] for m in r.request.messages)
            if PROCESS_KILLER in content:
                os._exit(137)  # no cleanup, no acknowledgement: what a segfault or the OOM killer leaves
            if POISON_PILL in content or (FLAKY in content and r.request.attempt == 0):
                self._dead = True
                raise EngineDied(f"instant engine: died running {r.request.request_id} (poison pill or flaky)")
        if self.token_seconds:
            time.sleep(self.token_seconds)
        self.steps += 1
        self.peak_running = max(self.peak_running, len(self._running))
        done = []
        for r in self._running.values():
            r.generated += 1
            if r.generated >= r.request.max_tokens:
                done.append(r)
        for r in done:
            del self._running[r.request.request_id]
        return [r.output("length") for r in done]

    def abort(self, request_ids: Sequence[str]) -> list[EngineOutput]:
        out = []
        for rid in request_ids:
            r = self._running.pop(rid, None)
            if r is None and rid in self._waiting:
                r = self._waiting.pop(rid)[2]
            if r is not None:
                out.append(r.output("abort"))
        return out

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def restart(self) -> None:
        self._running.clear()
        self._waiting.clear()
        self._dead = False
        self.restarts += 1

    def close(self) -> None:
        self._running.clear()
        self._waiting.clear()


def create(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> InstantTestEngine:
    """Registry factory (engine name ``instant``)."""
    return InstantTestEngine(
        name=model.name,
        token_seconds=settings.instant_token_seconds,
        max_model_len=model.engine_max_model_len,
        max_inflight=model.engine.max_num_seqs or settings.max_inflight or 256,
    )
