"""Which offsets are safe to commit when requests finish out of log order."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OffsetTracker"]

TP = tuple[str, int]


@dataclass
class _Partition:
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class OffsetTracker:
    """Commit position per partition = lowest offset still pending (or one past the last seen).

    A message counts as pending from the moment it is fetched until its results are
    acknowledged, so a crash re-delivers every message whose results might not exist.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def fetched(self, tp: TP, offset: int) -> None:
        part = self._parts.setdefault(tp, _Partition())
        part.pending.add(offset)
        if part.next_offset is None or offset + 1 > part.next_offset:
            part.next_offset = offset + 1

    def done(self, tp: TP, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.pending.discard(offset)

    def forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def committable(self) -> dict[TP, int]:
        """Positions that moved since the last :meth:`mark_committed`."""
        out: dict[TP, int] = {}
        for tp, part in self._parts.items():
            if part.next_offset is None:
                continue
            pos = min(part.pending) if part.pending else part.next_offset
            if pos != part.committed:
                out[tp] = pos
        return out

    def mark_committed(self, positions: dict[TP, int]) -> None:
        for tp, pos in positions.items():
            if tp in self._parts:
                self._parts[tp].committed = pos

    def pending_count(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())
