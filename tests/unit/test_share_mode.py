"""GPU consumers in a share group (KIP-932), on the runtime's stub broker: several consumers
share one partition, each request is acknowledged on its own (accepted once its records are
acknowledged, released untouched when the consumer stops, rejected after its dead letter), and a
request delivered as many times as the group's delivery limit becomes a dead letter."""

from __future__ import annotations

from collections import Counter
from typing import Any

from core.catalog import Catalog
from core.kafka import ShareLoop
from core.kafka.stub import StubBroker
from core.settings import Settings
from core.topics import Topics
from gpu_consumers.instant_engine import InstantTestEngine
from gpu_consumers.worker import GpuWorker
from schemas import ChatMessage, DeadLetter, InferenceRequest, InferenceResult, Priority, Route, Serde
from tests.support import model_entry

SERDE = Serde()
PREFIX = "s."
TOPICS = Topics(PREFIX)
GROUP = f"{PREFIX}gpu-m-share"
LOW = TOPICS.model("m", Priority.LOW)


def _broker() -> StubBroker:
    broker = StubBroker()
    for t in [*TOPICS.model_topics("m"), TOPICS.results, TOPICS.cost_metrics, TOPICS.dead_letter, TOPICS.status]:
        broker.create_topic(t)
    return broker


def _worker(
    broker: StubBroker, max_inflight: int = 4, token_seconds: float = 0.0, batch: int = 2, **consumer: Any
) -> tuple[GpuWorker, ShareLoop]:
    settings = Settings(
        topic_prefix=PREFIX, engine={"kind": "instant", "drain_s": 0.0}, consumer={"lanes_per_priority": 2, **consumer}
    )
    engine = InstantTestEngine("m", max_model_len=100_000, max_inflight=max_inflight, token_seconds=token_seconds)
    worker = GpuWorker(
        settings,
        Catalog(models=[model_entry("m", context_length=100_000)]),
        "m",
        engine,
        serde=SERDE,
        producer=broker.producer(),
        watch_cancellations=False,
    )
    loop = worker.loop(share=lambda: broker.share_consumer(GROUP, max_poll_records=batch))
    assert isinstance(loop, ShareLoop)
    return worker, loop


def _feed(broker: StubBroker, n: int, tokens: int = 2, prefix: str = "r", content: str = "x") -> list[str]:
    ids = []
    for i in range(n):
        r = InferenceRequest(
            request_id=f"{prefix}{i}",
            priority=Priority.LOW,
            messages=[ChatMessage(role="user", content=f"{content} {i}")],
            max_tokens=tokens,
            route=Route(model="m", reason="test"),
        )
        broker.append(LOW, SERDE.encode(r), r.request_id.encode())
        ids.append(r.request_id)
    return ids


def _results(broker: StubBroker) -> list[InferenceResult]:
    return [SERDE.decode(InferenceResult, m.value()) for m in broker.messages(TOPICS.results)]


def test_consumers_share_one_partition_and_each_request_is_answered_once() -> None:
    broker = _broker()
    ids = _feed(broker, 60)
    loops = [_worker(broker)[1] for _ in range(3)]
    for _ in range(200):
        for loop in loops:
            loop.run_once(wait=0)
    results = _results(broker)
    assert Counter(r.request_id for r in results) == Counter({rid: 1 for rid in ids})
    by_run = Counter(r.engine_run_id for r in results)
    assert len(by_run) == 3 and min(by_run.values()) > 0  # every consumer ran some
    assert sum(loop.acknowledged["accept"] for loop in loops) == 60


def test_acquisition_is_bounded_by_what_the_engine_can_start_soon() -> None:
    broker = _broker()
    _feed(broker, 200, tokens=50)
    _, loop = _worker(broker, max_inflight=4)
    for _ in range(5):
        loop.run_once(wait=0)
    # Free slots plus a small prefetch, give or take one poll's batch: the rest stays available
    # to the other consumers of the group.
    assert loop.held <= 4 + 2 + 2
    _, other_loop = _worker(broker, max_inflight=4)
    other_loop.run_once(wait=0)
    assert other_loop.held > 0


def test_short_requests_are_acknowledged_while_a_long_one_runs() -> None:
    broker = _broker()
    _feed(broker, 1, tokens=5_000, prefix="long")
    _feed(broker, 30, tokens=2, prefix="short")
    worker, loop = _worker(broker, max_inflight=8)
    for _ in range(300):
        loop.run_once(wait=0)
    assert "long0" in worker.inflight
    assert loop.acknowledged["accept"] == 30 and len(_results(broker)) == 30


def test_a_stopping_consumer_releases_what_it_has_not_started_and_nothing_is_re_produced() -> None:
    broker = _broker()
    ids = _feed(broker, 20, tokens=3)
    worker, loop = _worker(broker, max_inflight=2)
    loop.run_once(wait=0)
    loop.run_once(wait=0)
    held = loop.held
    assert held > len(worker.inflight) > 0
    loop.finish()  # drain_s 0: running ones are released too
    loop.close()
    assert loop.held == 0 and loop.acknowledged["release"] >= held - loop.acknowledged["accept"]
    _, other = _worker(broker, max_inflight=8)
    for _ in range(100):
        other.run_once(wait=0)
    assert len(broker.messages(LOW)) == 20  # released, not re-produced
    assert Counter(r.request_id for r in _results(broker)) == Counter({rid: 1 for rid in ids})


def test_a_dead_consumers_requests_go_to_the_others_once_their_locks_run_out() -> None:
    broker = _broker()
    ids = _feed(broker, 30, tokens=3)
    _, dead = _worker(broker, max_inflight=4)
    dead.run_once(wait=0)
    held_at_death = dead.held
    assert held_at_death > 0
    # kill -9: nothing acknowledged, nothing released; the broker hands its records out again.
    assert broker.expire_locks(GROUP) == held_at_death
    _, survivor = _worker(broker, max_inflight=8)
    for _ in range(200):
        survivor.run_once(wait=0)
    counts = Counter(r.request_id for r in _results(broker))
    assert set(counts) == set(ids) and all(n == 1 for n in counts.values())


def test_a_request_delivered_up_to_the_limit_is_dead_lettered_and_rejected() -> None:
    broker = _broker()
    broker.delivery_limit = 3
    (poison,) = _feed(broker, 1, tokens=3, prefix="poison")
    ids = _feed(broker, 5, tokens=3)
    for _ in range(2):
        # A consumer takes it and its process dies, twice.
        _, victim = _worker(broker, max_inflight=1, batch=1, delivery_limit=3, lanes_per_priority=1)
        victim.run_once(wait=0)
        broker.expire_locks(GROUP)
    _, loop = _worker(broker, max_inflight=8, delivery_limit=3)
    for _ in range(100):
        loop.run_once(wait=0)
    results = {r.request_id: r for r in _results(broker)}
    assert results[poison].status == "failed" and "delivered 3 times" in (results[poison].error or "")
    (dl,) = [SERDE.decode(DeadLetter, m.value()) for m in broker.messages(TOPICS.dead_letter)]
    assert dl.request_id == poison and dl.reason.value == "retries_exhausted"
    assert loop.acknowledged["reject"] == 1
    assert all(results[rid].status == "succeeded" for rid in ids)
    assert broker.share_state[GROUP][(LOW, 0, 0)].state == "archived"
