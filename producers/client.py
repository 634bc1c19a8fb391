"""The producer client: ``submit(...) -> request_id``.

Requests are keyed by their dedupe key (their request id when they have none), so each lands on
the partition of its dedupe-table entry and the router settles it without a repartition hop
(``core.placement``). They are published with ``acks=all`` and idempotence on, through the
runtime's tracked publisher (``core.kafka.TrackedPublisher``). Delivery is asynchronous, as
with confluent-kafka; :meth:`SluiceClient.flush` waits for every acknowledgement and raises if
any request was not acknowledged, so a caller never believes a lost request was queued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, cast

from confluent_kafka import KafkaException

from core import clients
from core.errors import BrokerError, ConfigError
from core.headers import new_traceparent, valid_traceparent
from core.kafka import Out, Producer, TrackedPublisher
from core.placement import placement_key
from core.settings import Settings
from core.topics import Topics
from schemas import AvroRecord, ChatMessage, InferenceRequest, Priority, RequestState, RequestStatus, Serde

__all__ = ["SluiceClient"]

logger = logging.getLogger(__name__)


class SluiceClient:
    def __init__(
        self, settings: Settings | None = None, *, serde: Serde | None = None, producer: Producer | None = None
    ) -> None:
        """``producer``: the stub broker's in tests; otherwise built from ``settings`` on first use."""
        self.settings = settings or Settings()
        self.topics = Topics(self.settings.topic_prefix)
        self._serde = serde or clients.serde(self.settings)
        self._producer = producer
        self._publisher: TrackedPublisher | None = None
        self._lock = threading.Lock()

    @property
    def publisher(self) -> TrackedPublisher:
        # Lazy, like Quix Streams: constructing a client does not connect.
        with self._lock:
            if self._publisher is None:
                if self._producer is None:
                    self._producer = cast(Producer, clients.producer(self.settings.kafka, "producer"))
                self._publisher = TrackedPublisher(self._producer, self._serde)
            return self._publisher

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | Mapping[str, str]] | None = None,
        system: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        model: str | None = None,
        tenant: str = "default",
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        deadline: datetime | None = None,
        cache: bool = True,
        metadata: Mapping[str, str] | None = None,
        stop: Iterable[str] = (),
        response_format: str | None = None,
        reply_to: str | None = None,
        webhook_url: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        """Queue one chat request; returns its request id (delivery completes asynchronously).

        ``traceparent`` (W3C trace context) continues the caller's trace; without one the request
        starts its own. It travels as a header through every stage to the result."""
        if (prompt is None) == (messages is None):
            raise ConfigError("pass exactly one of `prompt` or `messages`")
        msgs: list[Any] = []
        if system:
            msgs.append({"role": "system", "content": system})
        if prompt is not None:
            msgs.append({"role": "user", "content": prompt})
        else:
            assert messages is not None
            msgs.extend(m if isinstance(m, ChatMessage) else dict(m) for m in messages)
        fields: dict[str, Any] = {
            "tenant": tenant,
            "priority": priority,
            "messages": msgs,
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "idempotency_key": idempotency_key,
            "correlation_id": correlation_id,
            "deadline": deadline,
            "cache": cache,
            "metadata": dict(metadata or {}),
            "stop": list(stop),
            "response_format": response_format,
            "reply_to": reply_to,
            "webhook_url": webhook_url,
        }
        if request_id is not None:
            fields["request_id"] = request_id
        return self.submit_request(InferenceRequest.model_validate(fields), traceparent=traceparent)

    def submit_request(
        self, request: InferenceRequest, *, traceparent: str | None = None, tracestate: str | None = None
    ) -> str:
        if traceparent is not None and not valid_traceparent(traceparent):
            raise ConfigError(f"traceparent {traceparent!r} is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>)")
        headers: list[tuple[str, str | bytes | None]] = [("tenant", request.tenant.encode())]
        if request.correlation_id:
            headers.append(("correlation_id", request.correlation_id.encode()))
        headers.append(("traceparent", (traceparent or new_traceparent()).encode()))
        if tracestate:
            headers.append(("tracestate", tracestate.encode()))
        topic = self.topics.requests(request.priority)
        outs = [Out(topic, placement_key(request, self.settings.processor), request, headers)]
        if self.settings.publish_status:
            status = RequestStatus.of(
                request.request_id, RequestState.QUEUED, detail=f"on {topic}", tenant=request.tenant
            )
            outs.append(Out(self.topics.status, request.request_id, status))
        self._publish(request.request_id, outs)
        return request.request_id

    def publish(self, topic: str, key: str, record: AvroRecord) -> None:
        """Publish any Sluice record (a batch status, a failed result for an invalid batch line)
        under ``key``; acknowledged by :meth:`flush` like requests are."""
        self._publish(key, [Out(topic, key, record)])

    def cancel(self, request_id: str, reason: str = "cancelled by the submitter") -> None:
        """Ask the GPU consumers to skip or stop a request (compacted topic, keyed by id).

        One that has not started is skipped; one running is aborted in the engine and billed for
        the tokens it used. Either gets a failed result, a ``cancelled`` dead letter and the status
        ``cancelled``."""
        record = RequestStatus.of(request_id, RequestState.CANCELLED, detail=reason)
        self._publish(request_id, [Out(self.topics.cancellations, request_id, record)])

    def _publish(self, key: str, outs: list[Out]) -> None:
        publisher = self.publisher
        try:
            publisher.publish(key, outs)
        except KafkaException as exc:
            raise BrokerError(f"cannot publish to {outs[0].topic} for request {key}: {exc}") from exc
        publisher.producer.poll(0)

    def poll(self) -> None:
        """Serve delivery reports (a long-running producer calls this now and then, as with
        confluent-kafka; :meth:`submit` does it too)."""
        if self._publisher is not None:
            self._publisher.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every queued request to be acknowledged; raise if any was not."""
        if self._publisher is None:
            return
        remaining = self._publisher.producer.flush(timeout)
        failed = self._publisher.take_errors()
        if remaining:
            raise BrokerError(f"{remaining} request(s) still unacknowledged after {timeout}s")
        if failed:
            for f in failed:
                logger.error("request %s not delivered: %s", f.unit, f.error)
            ids = ", ".join(str(f.unit) for f in failed[:5])
            raise BrokerError(f"{len(failed)} request(s) were not delivered: {ids}: {failed[0].error}")

    def close(self) -> None:
        self.flush()
        self._publisher = None
        self._producer = None

    def __enter__(self) -> SluiceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
