"""Webhooks for results and batches, signed per Standard Webhooks.

The worker consumes the results and batch-status topics (its own consumer group) and posts an
event for every result whose request named a ``webhook_url`` and for every batch that reached a
final state with one. Each delivery is retried with exponential backoff for a bounded time, then
given up: the request's status becomes ``webhook_failed`` and a dead letter records the event. A
failed delivery never loses a result: it stays on the results topic and in ClickHouse.

It runs on the runtime's committing loop (``core.kafka.ConsumeLoop``): posts run on a thread
pool, everything Kafka stays on the loop's thread, and an event is done once it was delivered or
its give-up records (dead letter, status) are acknowledged. Offsets are committed only past done
events, so a crash re-delivers (at least once; the ``webhook-id`` of a redelivery is the same, so
receivers can drop repeats).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import httpx
from confluent_kafka import Message

from analytics.results import chat_completion, error_code
from core import clients
from core.errors import SluiceError
from core.kafka import TP, ConsumeLoop, Handler, LazyProducer, Out, Producer, TrackedPublisher, message_coords
from core.notices import WEBHOOK_URL_HEADER
from core.settings import Settings, WebhookSettings
from core.topics import Topics
from gateway.openai_format import batch_object
from schemas import (
    BatchStatus,
    DeadLetter,
    DeadLetterReason,
    InferenceResult,
    RequestState,
    RequestStatus,
    ResultStatus,
    Serde,
    Stage,
    utcnow,
)

__all__ = [
    "TargetRefused",
    "WebhookEvent",
    "WebhookWorker",
    "check_target",
    "new_secret",
    "sign",
]

logger = logging.getLogger(__name__)


class TargetRefused(SluiceError):
    """A webhook URL Sluice will not call (scheme, or an address inside the network)."""


def new_secret() -> str:
    """A signing secret in the Standard Webhooks format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret_list: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256>`` per secret, space separated
    (several during a rotation; a receiver accepts any one it knows)."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    sigs = []
    for secret in secret_list:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        sigs.append("v1," + base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode())
    return " ".join(sigs)


def _allowed(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: list[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_target(url: str, allow: list[str]) -> None:
    """Refuse (SSRF) a URL that is not http(s), or whose host resolves to a private, loopback,
    link-local or otherwise internal address, unless the host or address is allow-listed. The
    check runs after DNS resolution and again before every delivery attempt."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise TargetRefused(f"webhook_url {url!r} must be an http(s) URL")
    host = u.hostname
    try:
        infos = socket.getaddrinfo(host, u.port or (443 if u.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise TargetRefused(f"webhook host {host!r} does not resolve: {exc}") from exc
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        internal = (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_reserved
            or ip.is_multicast
            or ip.is_unspecified
            or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_private)
        )
        if internal and not _allowed(host, ip, allow):
            raise TargetRefused(
                f"webhook host {host!r} resolves to {ip}, a private, loopback or link-local address "
                "(allow it with SLUICE_WEBHOOKS__ALLOW_PRIVATE)"
            )


@dataclass(frozen=True)
class WebhookEvent:
    url: str
    msg_id: str
    type: str
    data: dict[str, Any]
    request_id: str | None = None
    tenant: str | None = None

    def body(self) -> bytes:
        return json.dumps(
            {"type": self.type, "timestamp": utcnow().isoformat(), "data": self.data}, separators=(",", ":")
        ).encode()


def _msg_id(*parts: str) -> str:
    return "msg_" + hashlib.sha256(":".join(parts).encode()).hexdigest()[:32]


def result_event(r: InferenceResult) -> WebhookEvent | None:
    if not r.webhook_url:
        return None
    ok = r.status is ResultStatus.SUCCEEDED
    code, message = (None, None) if ok else error_code(r.error)
    data = {
        "id": r.request_id,
        "object": "async.request",
        "custom_id": r.custom_id,
        "batch_id": r.batch_id,
        "status": r.status.value,
        "response": chat_completion(r) if ok else None,
        "error": None if ok else {"code": code, "message": message},
    }
    kind = "request.completed" if ok else "request.failed"
    return WebhookEvent(r.webhook_url, _msg_id(r.request_id, kind), kind, data, r.request_id, r.tenant)


def at_risk_event(s: RequestStatus, url: str) -> WebhookEvent | None:
    if s.state is not RequestState.AT_RISK:
        return None
    data = {
        "id": s.request_id,
        "object": "async.request",
        "status": s.state.value,
        "model": s.model,
        "detail": s.detail,
    }
    kind = "request.at_risk"
    return WebhookEvent(url, _msg_id(s.request_id, kind), kind, data, s.request_id, s.tenant)


def batch_event(b: BatchStatus) -> WebhookEvent | None:
    if not b.webhook_url or not b.terminal:
        return None
    kind = f"batch.{b.state.value}"
    return WebhookEvent(b.webhook_url, _msg_id(b.batch_id, kind), kind, batch_object(b), None, b.tenant)


@dataclass(frozen=True)
class _Delivery:
    """One event being posted, and where it came from."""

    event: WebhookEvent
    tp: TP
    offset: int
    raw: bytes


class WebhookWorker(Handler):
    def __init__(
        self,
        settings: Settings,
        *,
        serde: Serde | None = None,
        http: httpx.Client | None = None,
        producer: Producer | None = None,
    ) -> None:
        """``producer`` (give-up records): the stub broker's in tests."""
        self.settings = settings
        self.cfg: WebhookSettings = settings.webhooks
        if not self.cfg.secrets:
            raise SluiceError("webhooks need a signing secret: set SLUICE_WEBHOOKS__SECRETS")
        self.serde = serde or clients.serde(settings)
        self.topics = Topics(settings.topic_prefix)
        self.http = http or httpx.Client(timeout=self.cfg.timeout_s, follow_redirects=False)
        self.group_id = f"{settings.topic_prefix}webhooks"
        self._producer = producer
        self.delivered = 0
        self.given_up = 0
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[Future[str | None], _Delivery] = {}
        self._paused = False
        self._stop = threading.Event()

    def deliver(self, event: WebhookEvent, stop: threading.Event) -> str | None:
        """Post ``event`` until a 2xx answer or the retry window ends; the last error, or None."""
        start = time.monotonic()
        delay = self.cfg.first_retry_s
        body = event.body()
        last = "not attempted"
        while True:
            try:
                check_target(event.url, self.cfg.allow_private)
            except TargetRefused as exc:
                return str(exc)  # not retried: the address will not become public
            ts = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": event.msg_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign([s.get_secret_value() for s in self.cfg.secrets], event.msg_id, ts, body),
                "user-agent": "sluice-webhooks",
            }
            try:
                resp = self.http.post(event.url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    return None
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - start + delay > self.cfg.retry_for_s:
                return last
            logger.info("webhook %s to %s: %s; retrying in %.1fs", event.msg_id, event.url, last, delay)
            if stop.wait(delay):
                return last
            delay = min(delay * 2, self.cfg.max_retry_s)

    def _give_up(self, d: _Delivery, error: str) -> list[Out]:
        event = d.event
        self.given_up += 1
        logger.warning("webhook %s for %s given up: %s", event.type, event.request_id or event.url, error)
        detail = f"{event.type} to {event.url}: {error}"
        dl = DeadLetter.from_event(
            DeadLetterReason.WEBHOOK_FAILED,
            detail,
            stage=Stage.DELIVERY,
            topic=d.tp[0],
            partition=d.tp[1],
            offset=d.offset,
            original=d.raw,
        )
        dl.request_id, dl.tenant = event.request_id, event.tenant
        outs = [Out(self.topics.dead_letter, event.request_id or event.msg_id, dl)]
        if event.request_id is not None:
            status = RequestStatus.of(event.request_id, RequestState.WEBHOOK_FAILED, detail=detail)
            outs.append(Out(self.topics.status, event.request_id, status))
        return outs

    def _event(self, topic: str, value: bytes, headers: Any) -> WebhookEvent | None:
        if topic == self.topics.results:
            return result_event(self.serde.decode(InferenceResult, value))
        if topic == self.topics.status:
            # Only records that carry a webhook address concern this worker: the rest are not decoded.
            url = dict(headers or []).get(WEBHOOK_URL_HEADER)
            if not isinstance(url, bytes):
                return None
            return at_risk_event(self.serde.decode(RequestStatus, value), url.decode())
        return batch_event(self.serde.decode(BatchStatus, value))

    # -- the loop -------------------------------------------------------------------------------
    def loop(self, consumer: Any | None = None, *, stop: threading.Event | None = None) -> ConsumeLoop:
        """The committing loop over results and batch states (``consumer``: the stub broker's in
        tests; ``stop`` cuts retries short on shutdown)."""
        if stop is not None:
            self._stop = stop
        if consumer is None:
            consumer = clients.consumer(self.settings.kafka, "webhooks", self.group_id)
        if self._producer is None:
            self._producer = cast(
                Producer, LazyProducer(lambda: cast(Producer, clients.producer(self.settings.kafka, "webhooks")))
            )
        self._pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="webhook")
        return ConsumeLoop(
            self,
            consumer,
            [self.topics.results, self.topics.batches, self.topics.status],
            publisher=TrackedPublisher(self._producer, self.serde),
            batch=self.cfg.concurrency,
            max_batches=1,
            commit_interval_s=1.0,
            idle_wait_s=0.2,
        )

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.loop(stop=stop).run(stop, ready)

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        topic, partition, offset = message_coords(msg)
        raw = msg.value() or b""
        try:
            event = self._event(topic, raw, msg.headers())
        except SluiceError as exc:
            logger.error("webhooks skipped %s[%d]@%d: %s", topic, partition, offset, exc)
            event = None
        if event is None:
            loop.done((topic, partition), offset)
            return
        assert self._pool is not None
        d = _Delivery(event, (topic, partition), offset, raw)
        self._running[self._pool.submit(self.deliver, event, self._stop)] = d

    def on_cycle(self, loop: ConsumeLoop) -> bool:
        self._settle(loop)
        # Bounded: deliveries that keep failing pause fetching instead of piling up.
        full = len(self._running) >= self.cfg.concurrency * 4
        if full != self._paused:
            (loop.pause if full else loop.resume)(loop.assigned)
            self._paused = full
        return False

    def _settle(self, loop: ConsumeLoop) -> None:
        assert loop.publisher is not None
        for future in [f for f in self._running if f.done()]:
            d = self._running.pop(future)
            error = future.result()
            if error is None:
                self.delivered += 1
                loop.done(d.tp, d.offset)
            elif self._stop.is_set():
                continue  # left not done: the next worker delivers it
            else:
                loop.publisher.publish((d.tp, d.offset), self._give_up(d, error))

    def on_revoke(self, loop: ConsumeLoop, tps: set[TP]) -> None:
        # Deliveries of these partitions finish (the next owner would repeat them otherwise).
        for future, d in list(self._running.items()):
            if d.tp in tps:
                future.result()
        self._settle(loop)

    def on_stop(self, loop: ConsumeLoop) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._settle(loop)
