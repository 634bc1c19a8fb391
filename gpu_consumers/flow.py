"""Partition flow control: which partitions this consumer owns, per priority, and when to stop
fetching them.

Backpressure is built on what this consumer has fetched and buffered (never on broker lag, which
some brokers misreport). When a priority's buffer is full its partitions are paused, and the
consumer seeks back to the first message it could not buffer: the client's prefetched backlog is
dropped (fetched again on resume) instead of queueing ahead of newly fetched high-priority work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from core.kafka import TP
from core.topics import PRIORITIES, Topics
from gpu_consumers.buffer import PriorityBuffer
from schemas import Priority

__all__ = ["FlowControl", "PartitionFlow"]

logger = logging.getLogger(__name__)


class FlowControl(Protocol):
    """What flow control asks of the consume loop (``core.kafka.ConsumeLoop``)."""

    def pause(self, tps: Iterable[TP]) -> None: ...

    def resume(self, tps: Iterable[TP]) -> None: ...

    def seek(self, tp: TP, offset: int) -> bool: ...


class PartitionFlow:
    def __init__(self, buffer: PriorityBuffer, topics: Topics) -> None:
        self.buffer = buffer
        self.topics = topics
        self.assigned: dict[Priority, set[TP]] = {p: set() for p in PRIORITIES}
        self.paused: set[Priority] = set()
        self._rewound: dict[TP, int] = {}
        self.draining = False

    def _priority(self, tp: TP) -> Priority:
        priority = self.topics.priority_of(tp[0])
        if priority is None:
            raise ValueError(f"{tp[0]} is not a model topic")
        return priority

    def owns(self, tp: TP) -> bool:
        return tp in self.assigned[self._priority(tp)]

    def assign(self, tps: list[TP]) -> None:
        for tp in tps:
            self.assigned[self._priority(tp)].add(tp)

    def revoke(self, tps: set[TP]) -> None:
        for tp in tps:
            self._rewound.pop(tp, None)
        for pr in PRIORITIES:
            self.assigned[pr] -= tps

    def skip(self, tp: TP, offset: int) -> bool:
        """A message prefetched past a rewind: it will be fetched again, so ignore it now."""
        rewound = self._rewound.get(tp)
        return rewound is not None and offset >= rewound

    def rewind(self, loop: FlowControl, tp: TP, offset: int) -> bool:
        """Hand a message back to the broker: pause its partition and seek to it."""
        loop.pause([tp])
        if not loop.seek(tp, offset):
            loop.resume([tp])
            logger.debug("cannot rewind %s to %d; buffering it instead", tp, offset)
            return False
        self._rewound[tp] = offset
        self.paused.add(self._priority(tp))
        return True

    def full(self, tp: TP) -> bool:
        return self.buffer.full(self._priority(tp).rank)

    def apply(self, loop: FlowControl) -> None:
        """Pause full priorities, resume those that drained below half (hysteresis)."""
        if self.draining:
            return
        for pr in PRIORITIES:
            tps = self.assigned[pr]
            if pr not in self.paused and self.buffer.full(pr.rank) and tps:
                loop.pause(tps)
                self.paused.add(pr)
            elif pr in self.paused and self.buffer.has_room(pr.rank):
                loop.resume(tps)
                for tp in tps:
                    self._rewound.pop(tp, None)
                self.paused.discard(pr)

    def stop_fetching(self, loop: FlowControl) -> None:
        """Draining: fetch nothing more (what is buffered stays uncommitted for the next owner)."""
        self.draining = True
        loop.pause([tp for pr in PRIORITIES for tp in self.assigned[pr]])
