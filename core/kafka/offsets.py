"""Which offsets are safe to commit when the work of messages finishes out of log order."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from core.kafka.coords import TP

__all__ = ["OffsetTracker"]


@dataclass
class _Partition:
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset taken
    committed: int | None = None


class OffsetTracker:
    """Commit position per partition = its lowest offset still pending (or one past the last one
    taken, once none is pending).

    A message is pending from the moment it is taken until its work is done (its records
    acknowledged, its rows inserted), so a crash re-delivers every message whose work might not
    exist. Thread-safe: work may finish on other threads (webhook deliveries).
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}
        self._lock = threading.Lock()

    def taken(self, tp: TP, offset: int) -> None:
        with self._lock:
            part = self._parts.setdefault(tp, _Partition())
            part.pending.add(offset)
            if part.next_offset is None or offset + 1 > part.next_offset:
                part.next_offset = offset + 1

    def done(self, tp: TP, offset: int) -> None:
        with self._lock:
            part = self._parts.get(tp)
            if part is not None:
                part.pending.discard(offset)

    def forget(self, tps: list[TP] | set[TP]) -> None:
        with self._lock:
            for tp in tps:
                self._parts.pop(tp, None)

    def committable(self, only: set[TP] | None = None) -> dict[TP, int]:
        """Positions that moved since the last :meth:`mark_committed`."""
        out: dict[TP, int] = {}
        with self._lock:
            for tp, part in self._parts.items():
                if part.next_offset is None or (only is not None and tp not in only):
                    continue
                pos = min(part.pending) if part.pending else part.next_offset
                if pos != part.committed:
                    out[tp] = pos
        return out

    def mark_committed(self, positions: dict[TP, int]) -> None:
        with self._lock:
            for tp, pos in positions.items():
                if tp in self._parts:
                    self._parts[tp].committed = pos
