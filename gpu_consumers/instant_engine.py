"""TEST DOUBLE: an instant engine for plumbing tests and overhead benchmarks. Not an LLM.

It answers with a deterministic echo so tests can check routing, batching, offsets and sinks
without loading a model. A prompt containing ``POISON_PILL`` makes the whole batch raise, as a
request that crashes a real engine would; one containing ``FLAKY`` does so on its first attempt
only, as a transient failure would. The real engine path is ``vllm_engine.VLLMEngine``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from gpu_consumers.engine import EngineOutput, EngineRequest
from sluice.catalog import ModelEntry
from sluice.settings import EngineSettings

__all__ = ["FLAKY", "POISON_PILL", "InstantTestEngine", "create"]

POISON_PILL = "POISON_PILL"
FLAKY = "FLAKY"


class InstantTestEngine:
    def __init__(self, name: str, batch_seconds: float = 0.0, max_model_len: int = 1024) -> None:
        self.name = name
        self.batch_seconds = batch_seconds
        self.max_model_len = max_model_len
        # The most recent batches' request ids, for tests (bounded: benchmarks run it for hours).
        self.batches: deque[list[str]] = deque(maxlen=1000)

    def generate(self, batch: Sequence[EngineRequest]) -> list[EngineOutput]:
        if any(POISON_PILL in m["content"] for r in batch for m in r.messages):
            raise RuntimeError("instant engine: poison pill in batch")
        if any(FLAKY in m["content"] and r.attempt == 0 for r in batch for m in r.messages):
            raise RuntimeError("instant engine: transient failure (first attempt of a FLAKY request)")
        self.batches.append([r.request_id for r in batch])
        if self.batch_seconds:
            time.sleep(self.batch_seconds)
        outputs = []
        for r in batch:
            words = " ".join(m["content"] for m in r.messages).split()
            prompt_tokens = len(words) + 4 * len(r.messages)
            if prompt_tokens + r.max_tokens > self.max_model_len:
                outputs.append(
                    EngineOutput(
                        request_id=r.request_id,
                        prompt_tokens=prompt_tokens,
                        error=f"prompt of {prompt_tokens} tokens + max_tokens {r.max_tokens} "
                        f"exceeds the {self.max_model_len}-token context",
                        error_kind="context_overflow",
                    )
                )
                continue
            n = min(r.max_tokens, 8)
            outputs.append(
                EngineOutput(
                    request_id=r.request_id,
                    text="echo: " + " ".join(words[:n]),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=n,
                    finish_reason="length" if n == r.max_tokens else "stop",
                )
            )
        return outputs

    def close(self) -> None:
        pass


def create(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> InstantTestEngine:
    """Registry factory (engine name ``instant``)."""
    return InstantTestEngine(
        name=model.name,
        batch_seconds=settings.instant_batch_seconds,
        max_model_len=min(model.context_length, settings.max_model_len),
    )
