"""What the processor sends, in the runtime's one shape (:class:`core.kafka.Out`).

The per-event logic returns records to send instead of producing, so it stays free of Faust and
can be unit-tested and benchmarked alone; the Faust app sends them.
"""

from __future__ import annotations

from core.catalog import Catalog
from core.headers import Headers
from core.kafka import Out
from core.topics import Topics
from schemas import AvroRecord, CacheKind, CostMetric, InferenceResult, RequestState, RequestStatus, ResultStatus, Serde

__all__ = ["Emitter", "Out"]


class Emitter:
    def __init__(self, topics: Topics, serde: Serde, catalog: Catalog, *, publish_status: bool = True) -> None:
        self.topics = topics
        self.serde = serde
        self.baseline = catalog.most_capable()
        self.catalog = catalog
        self.publish_status = publish_status

    def record(self, topic: str, key: str | None, record: AvroRecord, headers: Headers | None = None) -> Out:
        return Out(topic, key, record, list(headers or []))

    def status(
        self, request_id: str, state: RequestState, *, model: str | None = None, detail: str | None = None
    ) -> list[Out]:
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
    ) -> list[Out]:
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
