"""The delivery workers on the runtime's stub broker: the result fan-out copies each result to its
tenant's and its requester's topics and commits only once the copies are acknowledged (a refused
copy becomes a dead letter), the webhook worker commits a result only once its webhook was
answered or given up, and ``follow_results`` hands every result over."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from analytics.results import follow_results
from core.kafka.stub import StubBroker
from core.settings import Settings
from core.topics import Topics
from gateway.fanout import ResultFanout
from gateway.webhooks import WebhookWorker
from schemas import (
    ChatMessage,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    RequestState,
    RequestStatus,
    ResultStatus,
    Serde,
    utcnow,
)
from tests.support import wait_until

SERDE = Serde()
TOPICS = Topics("d.")


def _result(rid: str, tenant: str = "team-a", **kw: Any) -> InferenceResult:
    req = InferenceRequest(request_id=rid, tenant=tenant, messages=[ChatMessage(role="user", content="x")], **kw)
    return InferenceResult.for_request(
        req, model="m", status=ResultStatus.SUCCEEDED, started_at=utcnow(), output_text="y"
    )


def _broker(*extra: str) -> StubBroker:
    broker = StubBroker()
    for t in (TOPICS.results, TOPICS.dead_letter, TOPICS.status, TOPICS.batches, *extra):
        broker.create_topic(t)
    return broker


def test_the_fanout_copies_and_commits_only_acknowledged_copies() -> None:
    broker = _broker("d.team-a.results", "d.team-a.replies.x")
    settings = Settings(
        topic_prefix="d.",
        tenants={
            "results_topics": {"team-a": "d.team-a.results"},
            "reply_to_patterns": {"team-a": ["d.team-a.replies.*"]},
        },
    )
    for i, reply in enumerate(["d.team-a.replies.x", None, "d.team-a.replies.gone"]):
        broker.append(TOPICS.results, SERDE.encode(_result(f"r{i}", reply_to=reply)), f"r{i}".encode())
    producer = broker.producer()
    producer.holding = True
    loop = ResultFanout(settings, serde=SERDE, producer=producer).loop(broker.consumer("d.fanout"))
    loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert broker.committed.get("d.fanout", {}).get((TOPICS.results, 0), 0) == 0  # nothing acknowledged yet
    producer.holding = False
    for _ in range(3):
        loop.run_once(wait=0)
    loop.commit(asynchronous=False)
    assert [m.key() for m in broker.messages("d.team-a.results")] == [b"r0", b"r1", b"r2"]
    assert [m.key() for m in broker.messages("d.team-a.replies.x")] == [b"r0"]
    # A reply topic that does not exist: the copy becomes a dead letter and the fan-out moves on.
    (dl,) = [SERDE.decode(DeadLetter, m.value()) for m in broker.messages(TOPICS.dead_letter)]
    assert dl.request_id == "r2" and dl.reason.value == "reply_to_refused" and "d.team-a.replies.gone" in dl.error
    assert broker.committed["d.fanout"][(TOPICS.results, 0)] == 3


class Receiver(httpx.BaseTransport):
    def __init__(self, status: int) -> None:
        self.status = status
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.posts += 1
        return httpx.Response(self.status)


def _webhooks(status: int) -> tuple[StubBroker, Any, Receiver]:
    broker = _broker()
    settings = Settings(
        topic_prefix="d.",
        webhooks={
            "secrets": ["whsec_" + "A" * 32],
            "first_retry_s": 0.01,
            "max_retry_s": 0.02,
            "retry_for_s": 0.05,
            "allow_private": ["hooks.example", "0.0.0.0/0"],
        },
    )
    receiver = Receiver(status)
    worker = WebhookWorker(settings, serde=SERDE, http=httpx.Client(transport=receiver), producer=broker.producer())
    return broker, worker, receiver


def test_a_webhook_is_committed_once_answered() -> None:
    broker, worker, receiver = _webhooks(204)
    broker.append(TOPICS.results, SERDE.encode(_result("r0", webhook_url="http://127.0.0.1:9/hook")), b"r0")
    broker.append(TOPICS.results, SERDE.encode(_result("r1")), b"r1")  # no webhook: done at once
    loop = worker.loop(broker.consumer("d.webhooks"))
    wait_until(lambda: (loop.run_once(wait=0), worker.delivered)[1], lambda n: n == 1, timeout=10, interval=0.01)
    loop.finish()
    assert receiver.posts == 1 and broker.committed["d.webhooks"][(TOPICS.results, 0)] == 2


def test_an_at_risk_status_with_a_webhook_address_is_posted_and_others_are_skipped() -> None:
    from core.notices import at_risk_records

    broker, worker, receiver = _webhooks(204)
    seen: list[httpx.Request] = []
    handle = receiver.handle_request

    def keep(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handle(request)

    receiver.handle_request = keep  # type: ignore[method-assign]
    hooked = InferenceRequest(
        request_id="r0", messages=[{"role": "user", "content": "x"}], webhook_url="http://127.0.0.1:9/hook"
    )
    for out in at_risk_records(TOPICS, hooked, model="m", detail="deadline in 5s", publish_status=True):
        assert isinstance(out.record, RequestStatus)
        broker.append(
            out.topic, SERDE.encode(out.record), b"r0", headers=[(k, bytes(v or b"")) for k, v in out.headers]
        )
    plain = RequestStatus.of("r1", RequestState.RUNNING)  # no webhook address: not even decoded
    broker.append(TOPICS.status, SERDE.encode(plain), b"r1")
    loop = worker.loop(broker.consumer("d.webhooks"))
    wait_until(lambda: (loop.run_once(wait=0), worker.delivered)[1], lambda n: n == 1, timeout=10, interval=0.01)
    loop.finish()
    assert receiver.posts == 1
    body = json.loads(seen[0].content)
    assert (
        body["type"] == "request.at_risk" and body["data"]["id"] == "r0" and body["data"]["detail"] == "deadline in 5s"
    )
    assert seen[0].headers["webhook-id"] and broker.committed["d.webhooks"][(TOPICS.status, 0)] == 2


def test_a_webhook_given_up_is_dead_lettered_and_marked_then_committed() -> None:
    broker, worker, receiver = _webhooks(500)
    broker.append(TOPICS.results, SERDE.encode(_result("r0", webhook_url="http://127.0.0.1:9/hook")), b"r0")
    loop = worker.loop(broker.consumer("d.webhooks"))
    wait_until(lambda: (loop.run_once(wait=0), worker.given_up)[1], lambda n: n == 1, timeout=10, interval=0.01)
    loop.finish()
    assert receiver.posts >= 2
    (dl,) = [SERDE.decode(DeadLetter, m.value()) for m in broker.messages(TOPICS.dead_letter)]
    (status,) = [SERDE.decode(RequestStatus, m.value()) for m in broker.messages(TOPICS.status)]
    assert dl.reason.value == "webhook_failed" and status.state.value == "webhook_failed"
    assert broker.committed["d.webhooks"][(TOPICS.results, 0)] == 1


def test_follow_results_hands_every_result_over() -> None:
    broker = _broker()
    for i in range(3):
        broker.append(TOPICS.results, SERDE.encode(_result(f"r{i}")), f"r{i}".encode())
    seen: list[str] = []
    stop = threading.Event()

    def on_result(r: InferenceResult) -> None:
        seen.append(r.request_id)
        if len(seen) == 3:
            stop.set()

    follow_results(
        Settings(topic_prefix="d."),
        on_result,
        stop,
        group_id="d.follow",
        serde=SERDE,
        consumer=broker.consumer("d.follow"),
    )
    assert seen == ["r0", "r1", "r2"] and broker.committed["d.follow"][(TOPICS.results, 0)] == 3
