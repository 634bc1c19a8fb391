"""The processor's per-event logic for request topics, free of Faust so it can be tested and
benchmarked alone.

Every input event yields its records to send (to the dedupe topic, a model topic, or the DLQ, plus
status events): bad input never raises out of :meth:`RequestPipeline.process`.
"""

from __future__ import annotations

import logging
from datetime import datetime

from core.catalog import Catalog
from core.errors import DeadLetterReason, PipelineRejection
from core.headers import carried
from core.kafka import Out
from core.placement import dedupe_key
from core.quota import QuotaLedger
from core.rejections import Source, rejection_records
from core.settings import ProcessorSettings, TenantSettings
from core.topics import Topics, reply_to_allowed
from schemas import InferenceRequest, RequestState, Serde, Stage, utcnow
from stream_processors.classifier import Classifier, RuleClassifier
from stream_processors.emit import Emitter
from stream_processors.risk import RiskReview
from stream_processors.router import Backlog, Router

__all__ = ["RequestPipeline"]

logger = logging.getLogger(__name__)


class RequestPipeline:
    def __init__(
        self,
        catalog: Catalog,
        topics: Topics,
        serde: Serde,
        settings: ProcessorSettings | None = None,
        *,
        router: Router | None = None,
        classifier: Classifier | None = None,
        publish_status: bool = True,
        tenancy: TenantSettings | None = None,
        quota: QuotaLedger | None = None,
        at_risk_margin_s: float = 60.0,
    ) -> None:
        self.topics = topics
        # Enqueued-token quotas (None: no tenant has one).
        self.quota = quota
        self.tenancy = tenancy or TenantSettings()
        self.serde = serde
        self.settings = settings or ProcessorSettings()
        self.router = router or Router(catalog, classifier or RuleClassifier(), backlog=Backlog())
        self.emit = Emitter(topics, serde, catalog, publish_status=publish_status)
        self.risk = RiskReview(
            self.router,
            catalog,
            self.emit,
            default=self.settings.on_risk,
            margin_s=at_risk_margin_s,
            tenancy=self.tenancy,
        )

    def process(
        self,
        value: bytes | None,
        *,
        topic: str,
        partition: int,
        offset: int,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        now: datetime | None = None,
    ) -> list[Out]:
        request: InferenceRequest | None = None
        now = now or utcnow()
        try:
            request = self.serde.decode(InferenceRequest, value)
            self._validate(request, topic, now)
            route = request.route = self.router.route(request)
            held = self.quota.admit(request) if self.quota is not None else None
        except PipelineRejection as exc:
            # A readable but invalid request still names its requester: they get a failed result.
            source = Source(topic, partition, offset, value or b"", timestamp_ms)
            return rejection_records(
                exc,
                source=source,
                stage=Stage.PROCESSOR,
                topics=self.topics,
                request=request,
                headers=carried(headers),
                publish_status=self.emit.publish_status,
            )
        request.dedupe_key = dedupe_key(request, self.settings)
        out: list[Out] = [] if held is None else [Out(self.topics.quota_ledger, request.request_id, held)]
        # May move the request up a priority or to another model, once, saying so.
        out += self.risk.review(request, now)
        route = request.route
        assert route is not None
        if request.deadline is not None and (request.deadline - now).total_seconds() < self.settings.deadline_warning_s:
            left = (request.deadline - now).total_seconds()
            out += self.emit.status(
                request.request_id, RequestState.QUEUED, model=route.model, detail=f"near deadline: {left:.1f}s left"
            )
        if request.dedupe_key is not None:
            # Repartition by dedupe key: every event about one key meets in one table partition.
            key = request.dedupe_key.encode()
            # The request's own headers ride along: the dedupe agent forwards or answers with them.
            fwd_headers = [*carried(headers), ("kind", b"request")]
            return [*out, Out(self.topics.dedupe, key, request, fwd_headers)]
        self.router.backlog.routed(route.model, request.request_id, priority=request.priority)
        fwd = Out(self.topics.model(route.model, request.priority), request.request_id, request, list(headers or []))
        return [
            *out,
            fwd,
            *self.emit.status(request.request_id, RequestState.ROUTED, model=route.model, detail=route.reason),
        ]

    def _validate(self, request: InferenceRequest, topic: str, now: datetime) -> None:
        if topic != self.topics.requests(request.priority):
            raise PipelineRejection(
                DeadLetterReason.VALIDATION_ERROR,
                f"priority {request.priority!r} does not match topic {topic}",
            )
        if request.prompt_chars() > self.settings.max_prompt_chars:
            raise PipelineRejection(
                DeadLetterReason.VALIDATION_ERROR,
                f"prompt has {request.prompt_chars()} characters; the limit is {self.settings.max_prompt_chars}",
            )
        if request.reply_to is not None and not reply_to_allowed(self.tenancy, request.tenant, request.reply_to):
            raise PipelineRejection(
                DeadLetterReason.REPLY_TO_REFUSED,
                f"tenant {request.tenant!r} may not receive results on {request.reply_to!r}",
            )
        if request.deadline is not None and request.deadline <= now:
            raise PipelineRejection(
                DeadLetterReason.DEADLINE_EXPIRED,
                f"deadline {request.deadline.isoformat()} passed before routing",
            )
