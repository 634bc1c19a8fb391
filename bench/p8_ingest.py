"""P8: batch ingest through the gateway. An OpenAI batch file goes through ``files.create`` and
``batches.create`` (the official ``openai`` package), and the clock stops when every request of the
batch is on its request topic. The gateway streams the file both ways, so its peak memory with a
50,000-line file should stay within 1.2x of its peak with a 1,000-line file (same process, the
small file first)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog
from gateway.keys import KeyStore, keys_path

__all__ = ["run_p8", "write_batch_file"]

# A document-enrichment request: a few hundred characters of text and an instruction.
_DOC = (
    "Ticket {i}: The customer reports that the export to CSV stops at about 10,000 rows and the "
    "download then fails with a timeout. They run the nightly job from a scheduler and need the "
    "full file by 6am. Browser and API behave the same. Account tier: business. Region: eu-west."
)


def write_batch_file(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "bench",
                "messages": [
                    {"role": "system", "content": "Classify the ticket: product area, urgency, sentiment. JSON."},
                    {"role": "user", "content": _DOC.format(i=i)},
                ],
                "max_tokens": 64,
                "temperature": 0,
            }
            f.write(
                json.dumps({"custom_id": f"ticket-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            )
    return path


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def run_p8(env: BenchEnv, quick: bool) -> ScenarioResult:
    from openai import OpenAI

    big_n = 10_000 if quick else 50_000
    settings = env.settings("p8", instant_catalog(), engine={"kind": "instant"})
    small = write_batch_file(settings.data_dir / "small.jsonl", 1_000)
    big = write_batch_file(settings.data_dir / "big.jsonl", big_n)
    with env.stack(settings, run_processor=False, run_consumers=False, run_gateway=True) as stack:
        pid = stack.pids()["gateway"]
        key = KeyStore(keys_path(stack.settings)).create("bench")
        client = OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0, timeout=600)
        observer = Observer(stack.settings, [stack.topics.requests("low")])
        try:
            figures: dict[str, float] = {}
            expected = 0
            for label, path, n in (("small", small, 1_000), ("big", big, big_n)):
                t0 = time.perf_counter()
                uploaded = client.files.create(file=path.open("rb"), purpose="batch")
                client.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                expected += n
                t_end = observer.wait_for(expected, timeout=900)
                figures[f"{label}_lines_per_s"] = n / (t_end - t0)
                figures[f"{label}_peak_rss_mib"] = _peak_rss_mib(pid)
        finally:
            observer.close()
    ratio = figures["big_peak_rss_mib"] / figures["small_peak_rss_mib"]
    return ScenarioResult(
        "P8",
        "batch ingest",
        {
            "lines": big_n,
            "file_mib": big.stat().st_size / 2**20,
            "lines_per_s": figures["big_lines_per_s"],
            "peak_rss_mib": figures["big_peak_rss_mib"],
            "peak_rss_1k_mib": figures["small_peak_rss_mib"],
            "lines_per_s_1k": figures["small_lines_per_s"],
        },
        ratio,
        f"gateway peak RSS, {big_n:,} lines vs 1,000 lines <= 1.2x",
        ratio <= 1.2,
    )
