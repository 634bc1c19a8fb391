"""``sluice demo``: one real run of the whole pipeline on the embedded stack.

Starts tansu, chDB, the Faust router and a vLLM consumer with SmolLM2-135M-Instruct (CPU), submits
a handful of prompts of mixed lengths at mixed priorities (one of them twice, to show dedupe) plus
one request for a model that does not exist, and prints each answer as it finishes (short ones
first: the engine takes them all at once and each leaves as soon as it is done). Then the same
prompts are served one at a time for comparison, and it ends with cost/latency and savings
summaries computed by SQL in ClickHouse and a line comparing output tokens/s and cost per 1M
output tokens.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from analytics.query import savings_sql, stats_sql
from analytics.results import follow_results
from core.catalog import load_catalog
from core.errors import SluiceError
from core.settings import Settings
from gpu_consumers.model_source import resolve_model_source
from producers import SluiceClient
from schemas import InferenceResult, Priority, ResultStatus
from sluice.local.stack import LocalStack

__all__ = ["DEMO_PROMPTS", "run_demo"]

logger = logging.getLogger(__name__)

# (priority, prompt, max_tokens as a share of --max-tokens): short and long answers mixed.
DEMO_PROMPTS: list[tuple[Priority, str, float]] = [
    (Priority.HIGH, "What is the capital of France? Answer in one sentence.", 0.3),
    (Priority.HIGH, "Name three primary colors.", 0.3),
    (Priority.NORMAL, "Write one sentence explaining what Apache Kafka is.", 1.0),
    (Priority.NORMAL, "Give a short tip for writing clear commit messages.", 1.0),
    (Priority.NORMAL, "What is 12 plus 30?", 0.2),
    (Priority.LOW, "Suggest a name for a friendly robot.", 0.4),
    (Priority.LOW, "Describe the ocean in one sentence.", 0.6),
    (Priority.LOW, "Why do people batch work together? One sentence.", 1.0),
]


def run_demo(settings: Settings, console: Console, *, max_tokens: int = 48, timeout: float = 600.0) -> int:
    catalog = load_catalog(settings.catalog_path)
    with console.status("Preparing models (converting SmolLM2 from its wheel once, ~1 min)…"):
        for m in catalog:
            path = resolve_model_source(m.source, settings.data_dir)
            console.print(f"[green]✓[/] model [bold]{m.name}[/] at {path}")
    run = uuid.uuid4().hex[:8]
    settings = settings.evolve(topic_prefix=f"sluice.demo-{run}.")
    with console.status("Starting tansu, chDB, the Faust router and the vLLM consumer…"):
        stack = LocalStack(settings, catalog).start()
    try:
        return _run(stack, console, run, max_tokens, timeout)
    finally:
        with console.status("Stopping everything the demo started…"):
            stack.stop()


def _run(stack: LocalStack, console: Console, run: str, max_tokens: int, timeout: float) -> int:
    settings = stack.settings
    console.print(f"[green]✓[/] broker on {stack.bootstrap_servers}, ClickHouse at {settings.clickhouse_url()}")
    stop = threading.Event()
    ready = threading.Event()
    results: dict[str, InferenceResult] = {}
    lock = threading.Lock()

    def on_result(r: InferenceResult) -> None:
        with lock:
            results[r.request_id] = r
        colour = {Priority.HIGH: "red", Priority.NORMAL: "yellow", Priority.LOW: "blue"}[r.priority]
        answer = (
            r.output_text.strip().replace("\n", " ") if r.status is ResultStatus.SUCCEEDED else f"[red]{r.error}[/]"
        )
        how = ""
        if r.deduplicated_from:
            how = f" [green]{'cache hit' if r.cached else 'deduplicated'}: answered with {r.deduplicated_from[:8]}[/]"
        console.print(
            f"[{colour}]{r.priority:>6}[/] [dim]{r.request_id[:8]}[/] {r.latency_ms / 1000:6.2f}s "
            f"{r.model} in={r.prompt_tokens} out={r.completion_tokens}{how}\n        {answer}"
        )

    follower = threading.Thread(
        target=follow_results,
        args=(settings, on_result, stop),
        kwargs={"on_ready": ready.set},
        daemon=True,
    )
    follower.start()
    ready.wait(30)
    client = SluiceClient(settings)
    lengths = [max(4, round(max_tokens * share)) for _, _, share in DEMO_PROMPTS]
    ids = [
        client.submit(p, priority=prio, tenant="demo", max_tokens=n, correlation_id=run)
        for (prio, p, _), n in zip(DEMO_PROMPTS, lengths, strict=True)
    ]
    # The same question twice: the second is attached to the first and never reaches the GPU.
    ids.append(
        client.submit(
            DEMO_PROMPTS[2][1], priority=Priority.LOW, tenant="demo", max_tokens=lengths[2], correlation_id=run
        )
    )
    bad = client.submit("This model does not exist.", model="gpt-nonexistent", tenant="demo")
    client.flush()
    console.print(
        f"Submitted {len(ids)} prompts (high/normal/low, one of them a duplicate) and 1 request for an "
        "unknown model; answers print as each finishes (the first ones wait for vLLM to start)…"
    )

    def wait_for(wanted: list[str]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stack.check()
            with lock:
                if all(i in results for i in wanted):
                    return
            time.sleep(0.1)
        missing = [i for i in wanted if i not in results]
        raise SluiceError(f"{len(missing)} demo request(s) got no result within {timeout:.0f}s")

    wait_for(ids)
    with lock:
        continuous = [results[i] for i in ids if not results[i].deduplicated_from]
    console.print("\nNow the same prompts one at a time, each waiting for its answer, as a synchronous server would:")
    one_by_one: list[InferenceResult] = []
    for (prio, p, _), n in zip(DEMO_PROMPTS, lengths, strict=True):
        rid = client.submit(p, priority=prio, tenant="demo-sync", max_tokens=n, cache=False, correlation_id=run)
        client.flush()
        wait_for([rid])
        with lock:
            one_by_one.append(results[rid])
    stop.set()
    follower.join(10)

    assert stack.store is not None
    store = stack.store
    db = settings.clickhouse.database
    id_list = [*ids, bad]
    until = time.monotonic() + 60
    while time.monotonic() < until:
        counts = store.query(
            f"SELECT (SELECT count() FROM {db}.results FINAL WHERE request_id IN {{ids:Array(String)}}),"
            f" (SELECT count() FROM {db}.dead_letters FINAL WHERE request_id = {{bad:String}})",
            {"ids": ids, "bad": bad},
        ).rows[0]
        if counts[0] == len(ids) and counts[1] >= 1:
            break
        time.sleep(0.3)
    dl = store.query(
        f"SELECT reason, error FROM {db}.dead_letters FINAL WHERE request_id = {{bad:String}}",
        {"bad": bad},
    ).rows
    if dl:
        console.print(f"[magenta]dead letter[/] {bad[:8]}: [bold]{dl[0][0]}[/] — {dl[0][1]}")
    summary = store.query(
        stats_sql(db, "r.request_id IN {ids:Array(String)}"),
        {"ids": id_list},
    )
    _print_table(
        console,
        "Cost and latency by model and priority (SQL on ClickHouse)",
        summary.columns,
        summary.rows,
    )
    savings = store.query(savings_sql(db, "request_id IN {ids:Array(String)}"), {"ids": id_list})
    _print_table(console, "Savings against running everything on the most capable model", savings.columns, savings.rows)
    _print_economics(console, stack, continuous, one_by_one)
    return 0


def _engine_rate(results: list[InferenceResult], *, concurrent: bool) -> tuple[int, float]:
    """(output tokens, engine seconds): the busy window when the requests ran together, the sum of
    each one's run when they ran one after another."""
    tokens = sum(r.completion_tokens for r in results)
    if concurrent:
        seconds = (max(r.completed_at for r in results) - min(r.started_at for r in results)).total_seconds()
    else:
        seconds = sum((r.completed_at - r.started_at).total_seconds() for r in results)
    return tokens, max(seconds, 1e-3)


def _print_economics(
    console: Console, stack: LocalStack, continuous: list[InferenceResult], one_by_one: list[InferenceResult]
) -> None:
    hour = next((m.gpu_hour_price for m in stack.catalog if m.gpu_hour_price), None) or 0.0
    tok_c, s_c = _engine_rate(continuous, concurrent=True)
    tok_o, s_o = _engine_rate(one_by_one, concurrent=False)
    rate_c, rate_o = tok_c / s_c, tok_o / s_o

    def per_million(rate: float) -> str:
        return f"${hour / 3600 / rate * 1_000_000:.2f}" if hour else "n/a"

    console.print(
        f"[bold]Continuous batching[/]: {rate_c:.1f} output tok/s ({per_million(rate_c)} per 1M output tokens at "
        f"${hour}/GPU-hour); [bold]one at a time[/]: {rate_o:.1f} tok/s ({per_million(rate_o)} per 1M) "
        f"→ {rate_c / rate_o:.1f}x the throughput for the same prompts."
    )


def _print_table(console: Console, title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "priority") else "right")
    for r in rows:
        table.add_row(*[f"{v:.6f}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)
