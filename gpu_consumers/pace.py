"""How fast this consumer's engine decodes, measured, and when a request's deadline is at risk.

Every running sequence gains one token per engine step, so a request's expected service time is
its tokens still to generate times the measured seconds per step (an exponentially weighted mean
of recent steps). A request is **at risk** when its deadline is less than ``margin_s`` after the
moment it would finish if it started (or went on) now: said once per request, while there is
still time to act.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Protocol

__all__ = ["DecodePace", "Timed"]


class Timed(Protocol):
    """What the estimate reads of a request (an ``InferenceRequest`` or a buffered one)."""

    @property
    def request_id(self) -> str: ...

    @property
    def deadline(self) -> datetime | None: ...

    @property
    def max_tokens(self) -> int: ...


# Weight of the newest step in the mean: about the last 50 steps count.
_ALPHA = 0.04
_REMEMBERED = 100_000


class DecodePace:
    def __init__(self, margin_s: float) -> None:
        self.margin_s = margin_s
        self.step_s: float | None = None
        self._flagged: OrderedDict[str, None] = OrderedDict()

    def observe(self, seconds: float, running: int) -> None:
        """One engine step of ``seconds`` with ``running`` sequences in it."""
        if running <= 0 or seconds <= 0:
            return
        self.step_s = seconds if self.step_s is None else (1 - _ALPHA) * self.step_s + _ALPHA * seconds

    @property
    def tokens_per_second(self) -> float | None:
        """Per sequence: how many tokens one request gains a second."""
        return 1.0 / self.step_s if self.step_s else None

    def service_s(self, request: Timed, generated: int = 0) -> float:
        """Seconds until ``request`` finishes if it runs now (0 before any step was measured)."""
        if self.step_s is None:
            return 0.0
        return max(0, request.max_tokens - generated) * self.step_s

    def at_risk(self, request: Timed, now: datetime, generated: int = 0) -> float | None:
        """The slack (seconds between the expected finish and the deadline) if it is below the
        margin and this request was not reported before; else None."""
        if request.deadline is None or request.request_id in self._flagged:
            return None
        slack = (request.deadline - now).total_seconds() - self.service_s(request, generated)
        if slack >= self.margin_s:
            return None
        self._flagged[request.request_id] = None
        while len(self._flagged) > _REMEMBERED:
            self._flagged.popitem(last=False)
        return slack
