"""What the processor sends: a :class:`Forward` is one record for one topic.

The per-event logic returns Forwards instead of producing, so it stays free of Faust and can be
unit-tested and benchmarked alone; the Faust app sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.catalog import Catalog
from core.headers import Headers
from core.topics import Topics
from schemas import AvroRecord, CacheKind, CostMetric, InferenceResult, RequestState, RequestStatus, ResultStatus, Serde

__all__ = ["Emitter", "Forward"]


@dataclass(frozen=True)
class Forward:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    record: AvroRecord | None = None
    # Unset: the producer's partitioner picks one from the key.
    partition: int | None = None


class Emitter:
    def __init__(self, topics: Topics, serde: Serde, catalog: Catalog, *, publish_status: bool = True) -> None:
        self.topics = topics
        self.serde = serde
        self.baseline = catalog.most_capable()
        self.catalog = catalog
        self.publish_status = publish_status

    def record(self, topic: str, key: str | None, record: AvroRecord, headers: Headers | None = None) -> Forward:
        return Forward(
            topic, key.encode() if key else None, self.serde.encode(record), list(headers or []), record=record
        )

    def status(
        self, request_id: str, state: RequestState, *, model: str | None = None, detail: str | None = None
    ) -> list[Forward]:
        if not self.publish_status:
            return []
        rec = RequestStatus.of(request_id, state, model=model, detail=detail)
        return [self.record(self.topics.status, request_id, rec)]

    def result(
        self,
        result: InferenceResult,
        *,
        cached: bool = False,
        deduplicated: bool = False,
        headers: Headers | None = None,
    ) -> list[Forward]:
        """A result the processor answers itself (duplicate or cache hit), with its cost metric:
        zero cost, and the saving measured against the most capable model. ``headers``: the
        answered request's trace context, tenant and correlation id."""
        out = [self.record(self.topics.results, result.request_id, result, headers)]
        if result.status is ResultStatus.SUCCEEDED:
            served_by = self.catalog.get(result.model)
            metric = CostMetric.for_result(
                result,
                model=result.model if served_by else self.baseline.name,
                cost_usd=0.0,
                baseline_cost_usd=self.baseline.cost_usd(result.prompt_tokens, result.completion_tokens),
                queue_wait_ms=0,
                batch_size=0,
                cached=cached,
                deduplicated=deduplicated,
            )
            out.append(self.record(self.topics.cost_metrics, result.request_id, metric, headers))
        detail = f"served from {result.deduplicated_from}" if result.deduplicated_from else None
        if result.cache_kind is CacheKind.SEMANTIC:
            detail = f"semantic match of {result.deduplicated_from} (similarity {result.similarity:.3f})"
        out += self.status(
            result.request_id,
            RequestState.CACHED if cached else RequestState(result.status.value),
            model=result.model,
            detail=detail,
        )
        return out
