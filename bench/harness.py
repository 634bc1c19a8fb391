"""Shared pieces of the benchmarks: the environment, observers, and the result record.

Every scenario measures its two sides in one run on one machine and reports their ratio, so the
figure compares like with like whatever the machine is.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from analytics.store import Store
from core import clients
from core.catalog import Catalog, ModelEntry, write_catalog
from core.settings import Settings
from schemas import InferenceResult
from sluice.local.stack import LocalStack

__all__ = [
    "BenchEnv",
    "Observer",
    "ScenarioResult",
    "kafka_unavailable",
    "percentile",
    "produce_all",
]

logger = logging.getLogger(__name__)


def paced(n: int, rate: float) -> Iterator[tuple[int, float]]:
    """``(i, t)`` for ``n`` sends at ``rate`` per second: each yielded at its time (slept until
    then), ``t`` the perf_counter time it was yielded."""
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for i in range(n):
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        next_at += interval
        yield i, time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


@dataclass
class ScenarioResult:
    scenario: str
    title: str
    measured: dict[str, float]
    ratio: float
    target: str
    passed: bool
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.measured.items())


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


class Observer:
    """Counts (and timestamps) messages arriving on topics, read from the beginning by assignment."""

    def __init__(self, settings: Settings, topics: list[str], decode_results: bool = False) -> None:
        self.settings = settings
        self.topics = topics
        self.decode_results = decode_results
        self.arrivals: dict[str, float] = {}
        # Messages per key and the partition each key was on (duplicates show as counts > 1).
        self.counts: dict[str, int] = {}
        self.partitions: dict[str, tuple[str, int]] = {}
        self.results: dict[str, InferenceResult] = {}
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._serde = clients.serde(settings)
        group = f"{settings.topic_prefix}bench-observer-{uuid.uuid4().hex[:6]}"
        self._consumer = clients.consumer(settings.kafka, "bench-observer", group)
        meta = self._consumer.list_topics(timeout=10).topics
        self._consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta[t].partitions])
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def _fetch(self) -> list[Any]:
        # poll() returns the moment a message is there; consume(n, timeout) would hold it until n
        # messages or the whole timeout (that wait was once measured as pipeline latency).
        first = self._consumer.poll(0.05)
        if first is None:
            return []
        return [first, *self._consumer.consume(999, timeout=0)]

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._fetch():
                if msg.error() is not None:
                    continue
                now = time.perf_counter()
                key = (msg.key() or b"").decode()
                with self._lock:
                    self.count += 1
                    self.arrivals.setdefault(key, now)
                    self.counts[key] = self.counts.get(key, 0) + 1
                    self.partitions[key] = (msg.topic() or "", msg.partition() or 0)
                    if self.decode_results:
                        self.results[key] = self._serde.decode(InferenceResult, msg.value())

    def wait_for(self, n: int, timeout: float) -> float:
        """Block until ``n`` messages have arrived; returns the perf_counter time it happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.count >= n:
                    return max(self.arrivals.values()) if self.arrivals else time.perf_counter()
            time.sleep(0.005)
        raise TimeoutError(f"only {self.count} of {n} messages on {self.topics} after {timeout:.0f}s")

    def wait_keys(self, keys: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(k in self.arrivals for k in keys):
                    return
            time.sleep(0.005)
        missing = sum(1 for k in keys if k not in self.arrivals)
        raise TimeoutError(f"{missing} of {len(keys)} keys never arrived on {self.topics}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def produce_all(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = clients.producer(settings.kafka, "bench-load", **{"linger.ms": 5, "batch.num.messages": 10000})
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(60):
        raise TimeoutError("benchmark input not acknowledged")


class BenchEnv:
    """One work directory and one ClickHouse (chDB allows one directory per process) for a run;
    each scenario starts its own embedded broker and stack with a unique topic prefix."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(f"chdb://{(work_dir / 'clickhouse').resolve()}", "sluice")
        self.store.ensure_schema()
        self._tiny: Path | None = None

    def tiny_model(self) -> Path:
        if self._tiny is None:
            from sluice.local.tiny_model import build_tiny_model

            self._tiny = build_tiny_model(self.work_dir / "models" / "tiny")
        return self._tiny

    def engine_model(self, quick: bool) -> tuple[ModelEntry, Path]:
        """The real-engine scenarios' model: the tiny test model in quick mode, SmolLM2 otherwise."""
        if quick:
            model_dir = self.tiny_model()
            source, name, context = str(model_dir), "tiny", 512
        else:
            from gpu_consumers.model_source import resolve_model_source

            source, name, context = "builtin:smollm2-135m-instruct", "smollm2-135m", 2048
            model_dir = resolve_model_source(source, self.work_dir / "data")
        entry = ModelEntry(
            name=name,
            source=source,
            tier=1,
            context_length=context,
            input_price_per_1m=0.02,
            output_price_per_1m=0.04,
            gpu_hour_price=1.2,
        )
        return entry, model_dir

    def settings(self, name: str, catalog: Catalog, **changes: Any) -> Settings:
        """A scenario's settings (``changes`` as for :meth:`Settings.evolve`)."""
        data_dir = self.work_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        return Settings(
            data_dir=data_dir,
            topic_prefix=f"bench-{name}-{uuid.uuid4().hex[:6]}.",
            catalog_path=write_catalog(catalog, data_dir / "catalog.toml"),
        ).evolve(**changes)

    @contextmanager
    def stack(self, settings: Settings, **kw: Any) -> Iterator[LocalStack]:
        stack = LocalStack(settings, store=self.store, **kw)
        try:
            yield stack.start()
        finally:
            stack.stop()

    def close(self) -> None:
        self.store.close()


def kafka_unavailable() -> str | None:
    """Why Apache Kafka cannot run here (no Java, no jars), or None when it can."""
    from core.errors import SluiceError
    from sluice.local.kafka import java_binary, kafka_libs

    try:
        java_binary()
        kafka_libs()
    except SluiceError as exc:
        return str(exc)
    return None


def instant_catalog(name: str = "bench") -> Catalog:
    return Catalog(
        models=[
            ModelEntry(
                name=name,
                source="builtin:unused-by-instant-engine",
                tier=1,
                context_length=4096,
                input_price_per_1m=0.02,
                output_price_per_1m=0.04,
                gpu_hour_price=1.2,
            )
        ]
    )
