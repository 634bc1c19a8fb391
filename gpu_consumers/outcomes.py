"""The records a finished request becomes: result, cost metric and status; or a failed result, a
dead letter and a cost metric for the tokens it used; or a retry. Pure functions of the request and
what the engine reported, built with the constructors in ``schemas`` (the processor builds its
records the same way), so they are unit-tested without a broker."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from core.catalog import ModelEntry
from core.headers import Headers
from core.kafka import Out
from core.rejections import Source, rejection_records
from core.settings import RetrySettings
from core.topics import Topics
from gpu_consumers.buffer import Buffered
from gpu_consumers.engine import EngineOutput
from schemas import (
    CostMetric,
    DeadLetter,
    DeadLetterReason,
    InferenceRequest,
    InferenceResult,
    PipelineRejection,
    RequestState,
    RequestStatus,
    ResultStatus,
    Stage,
)

__all__ = ["Outcomes", "Usage"]


@dataclass(frozen=True)
class Usage:
    """What a request cost the engine: its share of engine time, and how many requests shared it."""

    engine_ms: float = 0.0
    concurrency: float = 1.0


class Outcomes:
    def __init__(
        self,
        entry: ModelEntry,
        baseline: ModelEntry,
        topics: Topics,
        retry: RetrySettings,
        *,
        run_id: str,
        publish_status: bool = True,
    ) -> None:
        self.entry = entry
        self.baseline = baseline
        self.topics = topics
        self.retry = retry
        # Stamped as engine_run_id on every result and cost metric: which engine run produced it.
        self.run_id = run_id
        self.publish_status = publish_status

    def status(self, request_id: str, state: RequestState, detail: str | None = None) -> list[Out]:
        if not self.publish_status:
            return []
        rec = RequestStatus.of(request_id, state, model=self.entry.name, detail=detail)
        return [Out(self.topics.status, request_id, rec)]

    def _metric(self, result: InferenceResult, usage: Usage) -> CostMetric:
        tokens = (result.prompt_tokens, result.completion_tokens)
        return CostMetric.for_result(
            result,
            engine_ms=usage.engine_ms,
            cost_usd=self.entry.cost_usd(*tokens),
            baseline_cost_usd=self.baseline.cost_usd(*tokens),
            engine_run_id=self.run_id,
            batch_size=max(1, round(usage.concurrency)),
        )

    def succeeded(self, item: Buffered, out: EngineOutput, started: datetime, usage: Usage) -> list[Out]:
        req = item.request
        result = InferenceResult.for_request(
            req,
            model=self.entry.name,
            status=ResultStatus.SUCCEEDED,
            started_at=started,
            output_text=out.text,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            engine_run_id=self.run_id,
        )
        rid = req.request_id
        return [
            Out(self.topics.results, rid, result, item.headers),
            Out(self.topics.cost_metrics, rid, self._metric(result, usage), item.headers),
            *self.status(rid, RequestState.SUCCEEDED, f"{out.completion_tokens} tokens, {out.finish_reason}"),
        ]

    def failed(
        self,
        item: Buffered,
        reason: DeadLetterReason,
        error: str,
        started: datetime,
        out: EngineOutput | None = None,
        usage: Usage | None = None,
    ) -> list[Out]:
        """A failed result and a dead letter; a cost metric too when the engine spent tokens on it
        (an aborted request is billed for what it used)."""
        req = item.request
        result = InferenceResult.failed(
            req,
            reason,
            error,
            model=self.entry.name,
            started_at=started,
            prompt_tokens=out.prompt_tokens if out else 0,
            completion_tokens=out.completion_tokens if out else 0,
            engine_run_id=self.run_id,
        )
        dl = self.dead_letter(reason, error, item, req)
        rid = req.request_id
        outs = [
            Out(self.topics.results, rid, result, item.headers),
            Out(self.topics.dead_letter, rid, dl, item.headers),
        ]
        if usage is not None and out is not None and (out.prompt_tokens or out.completion_tokens):
            outs.append(Out(self.topics.cost_metrics, rid, self._metric(result, usage), item.headers))
        return [*outs, *self.status(rid, reason.state, f"{reason.value}: {error}")]

    def dead_letter(
        self, reason: DeadLetterReason, error: str, item: Buffered, request: InferenceRequest | None
    ) -> DeadLetter:
        return DeadLetter.from_event(
            reason,
            error,
            stage=Stage.CONSUMER,
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
            original=item.value,
            timestamp_ms=item.timestamp_ms,
            request=request,
            model=self.entry.name,
        )

    def rejected(self, source: Source, rejection: PipelineRejection, headers: Headers | None = None) -> list[Out]:
        """A message that is not a request this consumer can run: a dead letter, and a failed
        result when the requester can still be read from it."""
        return rejection_records(
            rejection,
            source=source,
            stage=Stage.CONSUMER,
            topics=self.topics,
            model=self.entry.name,
            headers=headers,
            publish_status=self.publish_status,
        )

    def handback(self, item: Buffered, why: str) -> list[Out]:
        """A request this consumer started but will not finish (shutdown, lost partition), put
        back at the end of its own partition: once that is acknowledged, the offsets of the
        requests that finished behind it can be committed, so none of them runs twice, and the
        next owner runs this one."""
        req = item.request
        return [
            Out(item.topic, req.request_id, req, item.headers, partition=item.partition),
            *self.status(req.request_id, RequestState.QUEUED, f"handed back: {why}"),
        ]

    def max_attempts(self, request: InferenceRequest) -> int:
        wanted = request.metadata.get("max_attempts", "")
        return int(wanted) if wanted.isdigit() and int(wanted) >= 1 else self.retry.max_attempts

    def retry_or_fail(self, item: Buffered, error: str, started: datetime) -> list[Out]:
        """A transient engine failure: back to a delay topic (the partition keeps flowing), or a
        dead letter once the attempts are used up."""
        req = item.request
        max_attempts = self.max_attempts(req)
        if req.attempt + 1 >= max_attempts:
            reason = DeadLetterReason.RETRIES_EXHAUSTED if max_attempts > 1 else DeadLetterReason.ENGINE_ERROR
            return self.failed(item, reason, f"engine_error after {req.attempt + 1} attempt(s): {error}", started)
        backoff = self.retry.backoff_ms
        level = min(req.attempt, len(backoff) - 1)
        retry = req.model_copy(update={"attempt": req.attempt + 1})
        return [
            Out(self.topics.retry(level), req.request_id, retry, [("target", item.topic.encode()), *item.headers]),
            *self.status(
                req.request_id,
                RequestState.QUEUED,
                f"retry {req.attempt + 1} of {max_attempts - 1} in {backoff[level] / 1000:g}s after: {error}",
            ),
        ]
