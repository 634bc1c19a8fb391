"""Deadlines at risk when a request is routed, and what is done about it.

A GPU consumer orders requests by deadline only among those it has fetched; a request written
behind a deep backlog of its priority is not among them until the backlog ahead is fetched. So the
router looks first: the expected finish of a request with a deadline is the work its model has
outstanding at its priority and above (this router's backlog) over the rate that model finishes
requests, plus its own generation time (``max_tokens`` at the per-token time measured from
results). When the deadline is less than the margin after that, the request is **at risk** and its
policy (``on_risk``: in the request's metadata, else its tenant's, else the default) acts once:

* ``escalate``: it goes one priority up (low → normal → high): another topic, fetched beside the
  backlog, and a higher priority in vLLM's scheduler;
* ``reroute``: it goes to the next capable model whose estimate makes the deadline (only when the
  caller did not name a model); the cost metric prices the model that ran it;
* ``none``: only said.

Every case is said in a status event ``at_risk`` with the estimate and the decision; it is said
once (the request carries ``at_risk`` in its metadata, so the GPU consumer does not say it again).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime

from core.catalog import Catalog
from core.kafka import Out
from core.metrics import AT_RISK
from core.notices import at_risk_records
from core.settings import TenantSettings
from schemas import InferenceRequest, InferenceResult, Priority
from stream_processors.emit import Emitter
from stream_processors.router import Backlog, Router

__all__ = ["ON_RISK", "EnginePace", "RiskReview"]

logger = logging.getLogger(__name__)

ON_RISK = ("none", "escalate", "reroute")
_ALPHA = 0.1


class EnginePace:
    """Per model, from its results: how fast it finishes requests and how long a token takes."""

    def __init__(self, window_s: float = 120.0, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self._finished: dict[str, deque[float]] = {}
        self._token_s: dict[str, float] = {}

    def observe(self, result: InferenceResult, *, mine: bool = True) -> None:
        """``mine``: the request was routed by this router. Only those count toward the finish
        rate, which is set against this router's backlog (its share, with several workers)."""
        if result.engine_run_id is None or result.deduplicated_from is not None:
            return
        if mine:
            self._finished.setdefault(result.model, deque()).append(self.clock())
        if result.completion_tokens > 0:
            per_token = max(0.0, (result.completed_at - result.started_at).total_seconds()) / result.completion_tokens
            old = self._token_s.get(result.model)
            self._token_s[result.model] = per_token if old is None else (1 - _ALPHA) * old + _ALPHA * per_token

    def rate(self, model: str) -> float | None:
        """Requests per second the model finished over the window (None: too few to say)."""
        times = self._finished.get(model)
        if not times:
            return None
        now = self.clock()
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) < 10 or times[-1] - times[0] < 2.0:
            return None
        return (len(times) - 1) / (times[-1] - times[0])

    def token_s(self, model: str) -> float | None:
        return self._token_s.get(model)


class RiskReview:
    def __init__(
        self,
        router: Router,
        catalog: Catalog,
        emit: Emitter,
        *,
        default: str,
        margin_s: float,
        tenancy: TenantSettings,
        pace: EnginePace | None = None,
    ) -> None:
        self.router = router
        self.catalog = catalog
        self.emit = emit
        self.default = default
        self.margin_s = margin_s
        self.tenancy = tenancy
        self.pace = pace or EnginePace()

    @property
    def backlog(self) -> Backlog:
        return self.router.backlog

    def policy(self, request: InferenceRequest) -> str:
        asked = request.metadata.get("on_risk") or self.tenancy.on_risk.get(request.tenant) or self.default
        return asked if asked in ON_RISK else self.default

    def finish_s(self, model: str, priority: Priority, max_tokens: int) -> float | None:
        """Seconds until a request queued now on ``model`` at ``priority`` would finish."""
        rate, token_s = self.pace.rate(model), self.pace.token_s(model)
        if rate is None or token_s is None:
            return None
        return self.backlog.ahead(model, priority) / rate + max_tokens * token_s

    def review(self, request: InferenceRequest, now: datetime) -> list[Out]:
        """Say whether ``request`` is at risk and act on its policy (changing its priority or route
        in place); the status events to send."""
        if request.deadline is None or request.route is None or "at_risk" in request.metadata:
            return []
        model, priority = request.route.model, request.priority
        expected = self.finish_s(model, priority, request.max_tokens)
        if expected is None:
            return []
        left = (request.deadline - now).total_seconds()
        if left - expected >= self.margin_s:
            return []
        detail = f"deadline in {left:.0f}s; expected to finish in {expected:.0f}s on {model} at {priority}"
        policy = self.policy(request)
        if policy == "escalate" and priority is not Priority.HIGH:
            request.priority = Priority.by_rank(priority.rank - 1)
            request.metadata["escalated_from"] = priority.value
            detail += f"; escalated to {request.priority}"
        elif policy == "reroute" and request.model is None:
            detail += self._reroute(request, left)
        elif policy != "none":
            detail += f"; {policy} not possible"
        request.metadata["at_risk"] = policy
        AT_RISK.labels(model, priority).inc()
        logger.info("%s at risk: %s", request.request_id, detail)
        return at_risk_records(
            self.emit.topics, request, model=request.route.model, detail=detail, publish_status=self.emit.publish_status
        )

    def _reroute(self, request: InferenceRequest, left: float) -> str:
        assert request.route is not None
        current = request.route.model
        capable, _ = self.router.candidates(request)
        for entry in capable:
            if entry.name == current or not entry.available:
                continue
            expected = self.finish_s(entry.name, request.priority, request.max_tokens)
            # A model with no backlog and no measurement yet is taken at its word: nothing ahead.
            if expected is None and self.backlog.get(entry.name) == 0:
                expected = 0.0
            if expected is not None and left - expected >= self.margin_s:
                request.route = self.router.reroute(request, entry, f"rerouted from {current}: at risk there")
                return f"; rerouted to {entry.name} (expected {expected:.0f}s)"
        return "; no other capable model would make it"
