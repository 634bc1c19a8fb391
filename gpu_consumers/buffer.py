"""Bounded per-priority buffers of fetched requests, taken in priority order with aging.

Requests go to the engine from what this consumer has fetched and buffered (never from broker
lag, which some brokers report wrongly): high first, then normal, then low. A request that has
waited longer than ``aging_s`` since it was created counts one tier higher per ``aging_s``,
so low priority is never starved.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from core.headers import Headers
from schemas import InferenceRequest, Priority

__all__ = ["Buffered", "PriorityBuffer"]


@dataclass
class Buffered:
    topic: str
    partition: int
    offset: int
    value: bytes
    request: InferenceRequest
    arrived: float  # monotonic time it entered the buffer
    timestamp_ms: int | None = None  # the record's timestamp (part of a dead letter's id)
    # Its trace context, tenant and correlation id: copied onto everything written about it.
    headers: Headers = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.request.priority.rank


class PriorityBuffer:
    def __init__(self, capacity_per_priority: int, aging_s: float) -> None:
        self.capacity = capacity_per_priority
        self.aging_s = aging_s
        self._queues: dict[int, deque[Buffered]] = {p.rank: deque() for p in Priority}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, item: Buffered) -> None:
        self._queues[item.rank].append(item)

    def depth(self, rank: int) -> int:
        return len(self._queues[rank])

    def full(self, rank: int) -> bool:
        return len(self._queues[rank]) >= self.capacity

    def has_room(self, rank: int) -> bool:
        # Hysteresis: resume a paused priority once it drains below half its capacity.
        return len(self._queues[rank]) < self.capacity // 2 or self.capacity < 2

    def oldest_arrival(self) -> float | None:
        heads = [q[0].arrived for q in self._queues.values() if q]
        return min(heads) if heads else None

    def effective_rank(self, item: Buffered, now: datetime) -> int:
        if self.aging_s <= 0:
            return item.rank
        waited = (now - item.request.created_at).total_seconds()
        return item.rank - max(0, int(waited // self.aging_s))

    def best_rank(self, now: datetime) -> int | None:
        """The effective rank of the item :meth:`take` would return next."""
        ranks = [self.effective_rank(q[0], now) for q in self._queues.values() if q]
        return min(ranks, default=None)

    def take(self, n: int, now: datetime) -> list[Buffered]:
        out: list[Buffered] = []
        while len(out) < n:
            heads = [(self.effective_rank(q[0], now), q[0].arrived, r) for r, q in self._queues.items() if q]
            if not heads:
                break
            _, _, rank = min(heads)
            out.append(self._queues[rank].popleft())
        return out

    def drop(self, topic_partitions: set[tuple[str, int]]) -> int:
        dropped = 0
        for r, q in self._queues.items():
            keep = deque(i for i in q if (i.topic, i.partition) not in topic_partitions)
            dropped += len(q) - len(keep)
            self._queues[r] = keep
        return dropped

    def pop_where(self, keep: Callable[[Buffered], bool]) -> list[Buffered]:
        """Remove and return every item ``keep`` refuses."""
        out: list[Buffered] = []
        for r, q in self._queues.items():
            out += [i for i in q if not keep(i)]
            self._queues[r] = deque(i for i in q if keep(i))
        return out
