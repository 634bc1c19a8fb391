"""Results where each service wants them: a copy of every result on its tenant's own results topic
(``SLUICE_TENANTS__RESULTS_TOPICS``) and on the reply topic its request named (``reply_to``, the
Kafka request-reply convention; the router has already checked it against the tenant's patterns).

The shared results topic stays the source: this worker copies from it in its own consumer group
and commits only after the copies are acknowledged (at least once; results are keyed by request
id). A copy that cannot be delivered (a reply topic that does not exist) becomes a dead letter and
the worker moves on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

from confluent_kafka import Message

from core import clients
from core.errors import SluiceError
from core.kafka import ConsumeLoop, Handler, LazyProducer, Out, Producer, TrackedPublisher, message_coords
from core.settings import Settings
from core.topics import Topics
from schemas import DeadLetter, DeadLetterReason, InferenceResult, Serde, Stage

__all__ = ["ResultFanout"]

logger = logging.getLogger(__name__)


class ResultFanout(Handler):
    def __init__(self, settings: Settings, *, serde: Serde | None = None, producer: Producer | None = None) -> None:
        """``producer``: the stub broker's in tests."""
        self.settings = settings
        self.serde = serde or clients.serde(settings)
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}fanout"
        self._producer = producer
        self.copied = 0
        self.failed = 0

    @property
    def needed(self) -> bool:
        t = self.settings.tenants
        return bool(t.results_topics or t.reply_to_patterns)

    def loop(self, consumer: Any | None = None) -> ConsumeLoop:
        """The committing loop over the results topic (``consumer``: the stub broker's in tests)."""
        if consumer is None:
            consumer = clients.consumer(self.settings.kafka, "fanout", self.group_id)
        if self._producer is None:
            self._producer = cast(
                Producer, LazyProducer(lambda: cast(Producer, clients.producer(self.settings.kafka, "fanout")))
            )
        publisher = TrackedPublisher(self._producer, self.serde)
        return ConsumeLoop(self, consumer, [self.topics.results], publisher=publisher, idle_wait_s=0.2)

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.loop().run(stop, ready)

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        """Copy one result; it is done once every copy (or the dead letter of a refused one) is
        acknowledged."""
        topic, partition, offset = message_coords(msg)
        unit = ((topic, partition), offset)
        assert loop.publisher is not None
        try:
            result = self.serde.decode(InferenceResult, msg.value())
        except SluiceError as exc:
            logger.error("fanout skipped an undecodable result: %s", exc)
            loop.publisher.publish(unit, [])
            return
        targets = self.topics.result_topics(self.settings.tenants, result.tenant, result.reply_to)[1:]
        headers = msg.headers()
        copies = [Out(t, msg.key(), msg.value() or b"", headers if isinstance(headers, list) else []) for t in targets]

        def refused(error: str) -> list[Out]:
            return [self._dead_letter(msg, result, error)]

        loop.publisher.publish(unit, copies, on_failed=refused)
        self.copied += len(copies)

    def _dead_letter(self, msg: Message, result: InferenceResult, error: str) -> Out:
        self.failed += 1
        self.copied -= 1
        src, partition, offset = message_coords(msg)
        logger.warning("result %s not copied: %s", result.request_id, error)
        dl = DeadLetter.from_event(
            DeadLetterReason.REPLY_TO_REFUSED,
            f"result not delivered to {error}",
            stage=Stage.DELIVERY,
            topic=src,
            partition=partition,
            offset=offset,
            original=msg.value() or b"",
        )
        dl.request_id, dl.tenant = result.request_id, result.tenant
        return Out(self.topics.dead_letter, result.request_id, dl)
