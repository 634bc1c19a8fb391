"""How long a synchronous request would wait if it were queued now, so an overloaded stack says so
at once (429 ``resource_unavailable``, OpenAI Flex's contract) instead of by a timeout.

The estimate is the work ahead of the request over the rate the engines finish work:

- **ahead**: the unfinished requests on the model topics of its priority and above, read as the
  lag of each model's GPU consumer group (committed offsets move only past finished requests, so
  queued, buffered and running requests all count), refreshed every few seconds;
- **rate**: engine results per second over the last minute, counted by the gateway's result
  reader.

With no rate measured yet (an idle or just-started stack) there is no estimate and the request is
accepted. Lag needs committed offsets: with share-group GPU consumers (no committed offsets) only
the synchronous calls this gateway has in flight count as ahead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

from core import clients
from core.errors import SluiceError
from core.kafka.lag import group_lag
from core.metrics import gauge_family
from core.settings import Settings
from core.topics import Topics
from schemas import InferenceResult, Priority

__all__ = ["Capacity", "capacity_gauges"]

logger = logging.getLogger(__name__)

LagReader = Callable[[], dict[Priority, int]]


class Capacity:
    def __init__(
        self,
        settings: Settings,
        models: Iterable[str],
        *,
        lag: LagReader | None = None,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 60.0,
        refresh_s: float = 2.0,
    ) -> None:
        """``lag``: unfinished requests per priority (the stub's in tests; otherwise read from the
        broker)."""
        self.settings = settings
        self.models = list(models)
        self.topics = Topics(settings.topic_prefix)
        self.clock = clock
        self.window_s = window_s
        self.refresh_s = refresh_s
        self._lag_reader = lag or self._broker_lag
        self._lag: dict[Priority, int] = {}
        self._finished: deque[float] = deque()
        self._since = clock()
        self._lock = threading.Lock()
        self._admin: object | None = None
        # Synchronous calls of this gateway waiting, per priority (counted when lag is unknown).
        self.in_flight: dict[Priority, int] = {}

    # -- inputs ---------------------------------------------------------------------------------
    def finished(self, result: InferenceResult) -> None:
        """Every result read; those an engine ran (not cache hits or duplicates) set the rate."""
        if result.engine_run_id is None or result.deduplicated_from is not None:
            return
        with self._lock:
            self._finished.append(self.clock())

    def refresh(self) -> None:
        try:
            lag = self._lag_reader()
        except SluiceError as exc:
            logger.warning("queue estimate not refreshed: %s", exc)
            return
        with self._lock:
            self._lag = lag

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.refresh()
            stop.wait(self.refresh_s)

    def _broker_lag(self) -> dict[Priority, int]:
        if self._admin is None:
            self._admin = clients.admin(self.settings.kafka, "capacity")
        out: dict[Priority, int] = {}
        for model in self.models:
            topics = self.topics.model_topics(model)
            for topic, n in group_lag(self._admin, self.topics.gpu_group(model), topics).items():
                priority = self.topics.priority_of(topic)
                if priority is not None:
                    out[priority] = out.get(priority, 0) + n
        return out

    # -- the estimate ---------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Engine results per second over the window; None before any was seen in it."""
        now = self.clock()
        with self._lock:
            while self._finished and now - self._finished[0] > self.window_s:
                self._finished.popleft()
            n = len(self._finished)
        if n == 0:
            return None
        return n / max(1.0, min(self.window_s, now - self._since))

    def ahead(self, priority: Priority) -> int:
        """Unfinished requests that run before a new one of ``priority``."""
        with self._lock:
            lag = dict(self._lag)
        ranks = [p for p in Priority if p.rank <= priority.rank]
        if lag:
            return sum(lag.get(p, 0) for p in ranks)
        return sum(self.in_flight.get(p, 0) for p in ranks)

    def estimated_wait(self, priority: Priority) -> float | None:
        """Seconds a request of ``priority`` queued now would wait; None: no estimate yet."""
        ahead = self.ahead(priority)
        if ahead == 0:
            return 0.0
        rate = self.rate()
        return None if rate is None else (ahead + 1) / rate


def capacity_gauges(capacity: Capacity, waiting: Callable[[], int]) -> Iterable[GaugeMetricFamily]:
    """The estimate as the gateway sees it (a priority without an estimate has no sample)."""
    priorities = list(Priority)
    yield gauge_family(
        "sluice_gateway_queue_ahead_requests",
        "Unfinished requests a new request of this priority would wait behind",
        ["priority"],
        [([p.value], capacity.ahead(p)) for p in priorities],
    )
    waits = [(p, capacity.estimated_wait(p)) for p in priorities]
    yield gauge_family(
        "sluice_gateway_estimated_wait_seconds",
        "Estimated wait of a synchronous request queued now",
        ["priority"],
        [([p.value], w) for p, w in waits if w is not None],
    )
    rate = capacity.rate()
    yield gauge_family(
        "sluice_gateway_engine_results_per_second",
        "Engine results per second over the last minute, as the gateway reads them",
        [],
        [([], rate)] if rate is not None else [],
    )
    yield gauge_family(
        "sluice_gateway_sync_waiting_requests", "Synchronous calls waiting for their result", [], [([], waiting())]
    )
