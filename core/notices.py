"""The ``at_risk`` status record, built one way whichever stage noticed (router or GPU consumer).

It goes to the status topic like every state; when the request has a webhook, the record carries
its address in the ``webhook-url`` header, so the webhook worker posts ``request.at_risk`` without
decoding every status event, and it is sent even where status events are otherwise off.
"""

from __future__ import annotations

from core.kafka import Out
from core.topics import Topics
from schemas import InferenceRequest, RequestState, RequestStatus

__all__ = ["WEBHOOK_URL_HEADER", "at_risk_records"]

WEBHOOK_URL_HEADER = "webhook-url"


def at_risk_records(
    topics: Topics, request: InferenceRequest, *, model: str | None, detail: str, publish_status: bool
) -> list[Out]:
    if not publish_status and not request.webhook_url:
        return []
    status = RequestStatus.of(
        request.request_id, RequestState.AT_RISK, model=model, detail=detail, tenant=request.tenant
    )
    headers = [(WEBHOOK_URL_HEADER, request.webhook_url.encode())] if request.webhook_url else []
    return [Out(topics.status, request.request_id, status, headers)]
