"""Choose the model for a classified request: the cheapest one that is capable enough.

Rules, in order:

1. An explicit ``model`` wins if the catalog has it (else ``unknown_model``), provided its
   context fits (else ``context_overflow``).
2. Candidates are models whose context fits ``estimated input + max_tokens`` and whose tier is
   at least the required tier. If no model reaches the tier, the highest tier that fits the
   context is used instead and the reason says so (a small catalog still serves hard requests).
3. Among candidates, the cheapest by expected cost (input price x estimated input tokens +
   output price x max_tokens) that is available and under its backlog limit wins. A model that
   is ``available = false`` or at ``max_backlog`` is skipped: the request fails over to the
   next-cheapest capable model. When every capable model is over its backlog, the cheapest
   available one takes the request anyway (queueing beats failing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from core.catalog import Catalog, ModelEntry
from core.errors import DeadLetterReason, PipelineRejection
from schemas import InferenceRequest, Priority, Route, utcnow
from stream_processors.classifier import Classification, Classifier, RuleClassifier

__all__ = ["Backlog", "Router", "expected_cost"]

logger = logging.getLogger(__name__)


def expected_cost(entry: ModelEntry, c: Classification, max_tokens: int) -> float:
    return entry.cost_usd(c.estimated_input_tokens, max_tokens)


@dataclass
class Backlog:
    """Requests this processor routed to each model and has not yet seen a result for.

    Counted from the processor's own routing decisions and the results topic, not from broker
    lag (which some brokers misreport). With several processor instances each one sees its share.
    """

    _inflight: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # When each outstanding request was routed, oldest first, for the age of the oldest. Capped:
    # beyond it the newest are not tracked, so the oldest stays right.
    _since: dict[str, OrderedDict[str, float]] = field(default_factory=dict)
    max_tracked: int = 100_000
    # Outstanding per model and priority (what a new request of a priority waits behind), and the
    # priority each tracked request went out at.
    _by_priority: Counter[tuple[str, Priority]] = field(default_factory=Counter)
    _priority_of: dict[str, tuple[str, Priority]] = field(default_factory=dict)
    # Routed past the tracking cap: only counted.
    _untracked: Counter[str] = field(default_factory=Counter)

    def routed(
        self, model: str, request_id: str | None = None, at: float | None = None, priority: Priority | None = None
    ) -> None:
        with self._lock:
            self._inflight[model] += 1
            if request_id is not None:
                since = self._since.setdefault(model, OrderedDict())
                if len(since) < self.max_tracked and request_id not in since:
                    since[request_id] = time.time() if at is None else at
                elif request_id not in since:
                    self._untracked[model] += 1
                tracked = priority is not None and len(self._priority_of) < self.max_tracked
                if tracked and priority is not None and request_id not in self._priority_of:
                    self._priority_of[request_id] = (model, priority)
                    self._by_priority[(model, priority)] += 1

    def completed(self, model: str, request_id: str | None = None) -> bool:
        """A result of ``model``; True when it answers a request this router routed (with several
        router workers, each counts only its own share)."""
        with self._lock:
            since = self._since.get(model)
            mine = request_id is None or (since is not None and request_id in since) or request_id in self._priority_of
            if not mine and self._untracked[model] > 0:
                self._untracked[model] -= 1  # past the tracking cap: counted, not named
                mine = True
            if mine and self._inflight[model] > 0:
                self._inflight[model] -= 1
            if request_id is not None and since is not None:
                since.pop(request_id, None)
            held = self._priority_of.pop(request_id, None) if request_id is not None else None
            if held is not None and self._by_priority[held] > 0:
                self._by_priority[held] -= 1
            return mine

    def get(self, model: str) -> int:
        return self._inflight[model]

    def ahead(self, model: str, priority: Priority) -> int:
        """Outstanding requests of ``model`` that a new one of ``priority`` waits behind."""
        with self._lock:
            return sum(self._by_priority[(model, p)] for p in Priority if p.rank <= priority.rank)

    def oldest_age(self, model: str, now: float | None = None) -> float:
        """Seconds since the oldest outstanding request of ``model`` was routed (0 when none)."""
        with self._lock:
            since = self._since.get(model)
            if not since:
                return 0.0
            first = next(iter(since.values()))
        return max(0.0, (time.time() if now is None else now) - first)

    def over(self, entry: ModelEntry) -> bool:
        return entry.max_backlog is not None and self._inflight[entry.name] >= entry.max_backlog


@dataclass
class Router:
    catalog: Catalog
    classifier: Classifier = field(default_factory=RuleClassifier)
    backlog: Backlog = field(default_factory=Backlog)

    def route(self, request: InferenceRequest) -> Route:
        c = self.classifier.classify(request)
        if request.model is not None:
            entry = self.catalog.get(request.model)
            if entry is None:
                raise PipelineRejection(
                    DeadLetterReason.UNKNOWN_MODEL,
                    f"model {request.model!r} is not in the catalog ({', '.join(m.name for m in self.catalog)})",
                )
            if c.required_context > entry.context_length:
                raise PipelineRejection(
                    DeadLetterReason.CONTEXT_OVERFLOW,
                    f"needs ~{c.required_context} tokens; {entry.name} has a {entry.context_length}-token context",
                )
            return self._route(entry, c, f"explicit model requested; {c.reason}")
        return self._cheapest_capable(request, c)

    def candidates(self, request: InferenceRequest, c: Classification | None = None) -> tuple[list[ModelEntry], str]:
        """The models able to take ``request``, cheapest first, and a note when none reaches its tier."""
        c = c or self.classifier.classify(request)
        fits = [m for m in self.catalog if m.context_length >= c.required_context]
        if not fits:
            largest = max(m.context_length for m in self.catalog)
            raise PipelineRejection(
                DeadLetterReason.CONTEXT_OVERFLOW,
                f"needs ~{c.required_context} tokens; the largest context in the catalog is {largest}",
            )
        capable = [m for m in fits if m.tier >= c.required_tier]
        note = ""
        if not capable:
            top = max(m.tier for m in fits)
            capable = [m for m in fits if m.tier == top]
            note = f"; no model of tier >= {c.required_tier}, best is tier {top}"
        capable.sort(key=lambda m: (expected_cost(m, c, request.max_tokens), m.name))
        return capable, note

    def _cheapest_capable(self, request: InferenceRequest, c: Classification) -> Route:
        capable, note = self.candidates(request, c)
        skipped: list[str] = []
        for entry in capable:
            if not entry.available:
                skipped.append(f"{entry.name} unavailable")
            elif self.backlog.over(entry):
                skipped.append(f"{entry.name} backlog {self.backlog.get(entry.name)} >= {entry.max_backlog}")
            else:
                return self._route(entry, c, self._reason(entry, c, request, note, skipped))
        available = [m for m in capable if m.available]
        if available:
            entry = available[0]
            return self._route(entry, c, self._reason(entry, c, request, note + "; all over backlog", []))
        raise PipelineRejection(
            DeadLetterReason.UNKNOWN_MODEL,
            f"no available model for this request ({'; '.join(skipped)})",
        )

    @staticmethod
    def _reason(entry: ModelEntry, c: Classification, request: InferenceRequest, note: str, skipped: list[str]) -> str:
        cost = expected_cost(entry, c, request.max_tokens)
        failover = f"; failover past {', '.join(skipped)}" if skipped else ""
        return f"{c.reason}; cheapest capable: {entry.name} (tier {entry.tier}, est ${cost:.6f}){note}{failover}"

    def reroute(self, request: InferenceRequest, entry: ModelEntry, why: str) -> Route:
        """``request`` routed to ``entry`` instead of the model first chosen (reason kept, ``why`` added)."""
        c = self.classifier.classify(request)
        before = request.route.reason if request.route else ""
        return self._route(entry, c, f"{before}; {why}")

    @staticmethod
    def _route(entry: ModelEntry, c: Classification, reason: str) -> Route:
        return Route(
            model=entry.name,
            reason=reason,
            task_type=c.task_type,
            tier=entry.tier,
            estimated_input_tokens=c.estimated_input_tokens,
            routed_at=utcnow(),
        )
