"""P12: what the synchronous HTTP path adds. On an idle stack (instant engine), the same requests
through ``chat.completions.create`` (the official ``openai`` client, ``base_url`` at the gateway)
and through the SDK awaited on the results topic, one after the other at the same rate: p50/p99
of each and the difference. Then 500 calls waiting at once (``AsyncOpenAI``, an engine slow
enough that they wait): the gateway's resident memory before and while they wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI, OpenAI

from bench.harness import BenchEnv, Observer, ScenarioResult, instant_catalog, paced, percentile
from bench.p5_latency import steady_latencies
from gateway.keys import KeyStore, keys_path
from producers import SluiceClient
from sluice.local.stack import LocalStack

__all__ = ["run_p12"]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _gateway_pid(stack: LocalStack) -> int:
    pid = next(c.pid for c in stack.children if c.name == "gateway")
    assert pid is not None
    return pid


def _http_latencies(client: OpenAI, n: int, rate: float, tag: str) -> list[float]:
    out = []
    for i, t in paced(n, rate):
        client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"{tag} request {i}"}], max_tokens=8
        )
        out.append((time.perf_counter() - t) * 1000)
    return out


def _waiting(metrics_url: str) -> float:
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("sluice_gateway_sync_waiting_requests "):
            return float(line.split()[1])
    return 0.0


async def _hold(url: str, key: str, calls: int, metrics_url: str, pid: int) -> tuple[float, float, int]:
    """Start ``calls`` at once; sample the gateway's RSS while they wait. Returns (peak RSS MiB,
    most waiting at once, answered)."""
    async with AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600) as client:
        tasks = [
            asyncio.create_task(
                client.chat.completions.create(
                    model="bench",
                    messages=[{"role": "user", "content": f"held call {i}"}],
                    max_tokens=64,
                    service_tier="flex",
                )
            )
            for i in range(calls)
        ]
        peak, most = 0.0, 0.0
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.5)
            most = max(most, await asyncio.to_thread(_waiting, metrics_url))
            peak = max(peak, _rss_mib(pid))
        done = await asyncio.gather(*tasks, return_exceptions=True)
    return peak, most, sum(1 for d in done if not isinstance(d, BaseException))


def run_p12(env: BenchEnv, quick: bool) -> ScenarioResult:
    n, rate, held = (100, 10.0, 500) if quick else (500, 20.0, 500)
    settings = env.settings("p12", instant_catalog(), engine={"kind": "instant"})
    with env.stack(settings, run_gateway=True) as stack:
        assert stack.gateway_url is not None
        key = KeyStore(keys_path(stack.settings)).create("bench")
        client = OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0)
        observer = Observer(stack.settings, [stack.topics.results])
        sdk = SluiceClient(stack.settings)
        try:
            steady_latencies(sdk, observer, 5, 5.0, "warm-up", timeout=120, model="bench")
            _http_latencies(client, 5, 5.0, "warm-up")
            sdk_ms = steady_latencies(sdk, observer, n, rate, "p12-sdk", model="bench")
            http_ms = _http_latencies(client, n, rate, "p12-http")
        finally:
            observer.close()
            sdk.close()
        pid = _gateway_pid(stack)
        idle_rss = _rss_mib(pid)
    # The held calls need an engine slow enough that they wait (64 tokens of 0.2 s: ~13 s each).
    slow = env.settings("p12-held", instant_catalog(), engine={"kind": "instant", "instant_token_seconds": 0.2})
    with env.stack(slow, run_gateway=True) as stack:
        assert stack.gateway_url is not None
        key = KeyStore(keys_path(stack.settings)).create("bench")
        pid = _gateway_pid(stack)
        before = _rss_mib(pid)
        peak, most, answered = asyncio.run(
            _hold(f"{stack.gateway_url}/v1", key, held, stack.metrics_urls["gateway"], pid)
        )
    s50, s99 = percentile(sdk_ms, 0.50), percentile(sdk_ms, 0.99)
    h50, h99 = percentile(http_ms, 0.50), percentile(http_ms, 0.99)
    measured: dict[str, Any] = {
        "requests": n,
        "rate_per_s": rate,
        "sdk_p50_ms": s50,
        "sdk_p99_ms": s99,
        "http_p50_ms": h50,
        "http_p99_ms": h99,
        "added_p50_ms": h50 - s50,
        "added_p99_ms": h99 - s99,
        "gateway_idle_rss_mib": idle_rss,
        "held_calls": held,
        "held_most_waiting": most,
        "held_answered": answered,
        "gateway_rss_before_mib": before,
        "gateway_rss_peak_held_mib": peak,
    }
    per_call_kib = (peak - before) * 1024 / max(1.0, most)
    notes = (
        f"HTTP adds p50 {h50 - s50:+.1f} ms, p99 {h99 - s99:+.1f} ms over the SDK path; "
        f"{held} calls waiting at once ({most:.0f} seen waiting, {answered} answered): gateway RSS "
        f"{before:.0f} → {peak:.0f} MiB (~{per_call_kib:.0f} KiB per waiting call)"
    )
    # No target in the issue beyond reporting: the ratio is HTTP p50 over SDK p50.
    return ScenarioResult(
        "P12",
        "flex overhead (HTTP vs SDK)",
        measured,
        h50 / s50 if s50 else float("inf"),
        "reported: p50/p99 added by HTTP; gateway RSS with 500 waiting calls (all answered)",
        answered == held,
        notes=notes,
    )
