"""Choose the model for a request from the catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from schemas import InferenceRequest, Route, utcnow
from sluice.catalog import Catalog, ModelEntry
from sluice.errors import DeadLetterReason, PipelineRejection

__all__ = ["Router", "estimate_tokens"]

logger = logging.getLogger(__name__)


def estimate_tokens(text_chars: int) -> int:
    # ~4 characters per token for English BPE vocabularies; deliberately cheap and deterministic.
    return (text_chars + 3) // 4


@dataclass
class Router:
    catalog: Catalog

    def route(self, request: InferenceRequest) -> Route:
        est_input = estimate_tokens(request.prompt_chars())
        needed = est_input + request.max_tokens
        if request.model is not None:
            entry = self.catalog.get(request.model)
            if entry is None:
                raise PipelineRejection(
                    DeadLetterReason.UNKNOWN_MODEL,
                    f"model {request.model!r} is not in the catalog ({', '.join(m.name for m in self.catalog)})",
                )
            self._check_context(entry, needed)
            return Route(
                model=entry.name,
                reason="explicit model requested",
                tier=entry.tier,
                estimated_input_tokens=est_input,
                routed_at=utcnow(),
            )
        candidates = [m for m in self.catalog.by_cost() if m.available]
        for entry in candidates:
            if entry.context_length >= needed:
                return Route(
                    model=entry.name,
                    reason=f"cheapest available model with context >= {needed} tokens",
                    tier=entry.tier,
                    estimated_input_tokens=est_input,
                    routed_at=utcnow(),
                )
        largest = max((m.context_length for m in candidates), default=0)
        raise PipelineRejection(
            DeadLetterReason.CONTEXT_OVERFLOW,
            f"needs ~{needed} tokens; largest available context is {largest}",
        )

    @staticmethod
    def _check_context(entry: ModelEntry, needed: int) -> None:
        if needed > entry.context_length:
            raise PipelineRejection(
                DeadLetterReason.CONTEXT_OVERFLOW,
                f"needs ~{needed} tokens; {entry.name} has a {entry.context_length}-token context",
            )
