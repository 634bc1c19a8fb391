"""What is in the engine right now, and what each request's engine time is.

There are no batches to divide: every engine step's time is split equally among the requests in
the engine during that step, so the per-request shares add up to the worker's engine time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from core.kafka import TP
from gpu_consumers.buffer import Buffered
from gpu_consumers.outcomes import Usage

__all__ = ["InFlight", "Running"]


@dataclass
class Running:
    item: Buffered
    started: datetime
    rank: int
    engine_ms: float = 0.0
    steps: int = 0
    shared: int = 0

    @property
    def usage(self) -> Usage:
        return Usage(engine_ms=self.engine_ms, concurrency=self.shared / self.steps if self.steps else 1.0)


class InFlight:
    def __init__(self) -> None:
        self._running: dict[str, Running] = {}
        self.engine_seconds = 0.0

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._running

    def add(self, item: Buffered, started: datetime, rank: int) -> None:
        self._running[item.request.request_id] = Running(item, started, rank, engine_ms=item.spent_ms)

    def get(self, request_id: str) -> Running | None:
        return self._running.get(request_id)

    def pop(self, request_id: str) -> Running | None:
        return self._running.pop(request_id, None)

    def pop_all(self) -> list[Running]:
        running, self._running = list(self._running.values()), {}
        return running

    def charge(self, seconds: float) -> None:
        """Account one engine step to the requests that were in the engine during it."""
        self.engine_seconds += seconds
        if not self._running:
            return
        n = len(self._running)
        share = seconds * 1000 / n
        for r in self._running.values():
            r.engine_ms += share
            r.steps += 1
            r.shared += n

    def expired(self, now: datetime) -> list[str]:
        return [
            rid
            for rid, r in self._running.items()
            if r.item.request.deadline is not None and r.item.request.deadline <= now
        ]

    def on(self, tps: Iterable[TP]) -> list[str]:
        """Requests from these partitions."""
        wanted = set(tps)
        return [rid for rid, r in self._running.items() if (r.item.topic, r.item.partition) in wanted]

    def worst_rank(self) -> int | None:
        return max((r.rank for r in self._running.values()), default=None)

    def victim(self, outranked_by: int) -> Running | None:
        """The request to preempt for one of priority rank ``outranked_by``: the lowest-priority,
        least advanced of those of a lower priority (their own, not aged: a request that only
        aged never displaces one of its own priority) not preempted before (none: leave them be)."""
        candidates = [r for r in self._running.values() if r.item.rank > outranked_by and not r.item.preempted]
        return max(candidates, key=lambda r: (r.item.rank, -r.steps), default=None)

    def ids(self) -> list[str]:
        return list(self._running)
