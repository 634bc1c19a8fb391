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
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from core import clients
from core.errors import SluiceError
from core.settings import Settings
from core.topics import Topics, message_coords
from schemas import DeadLetter, DeadLetterReason, InferenceResult, Serde, Stage

__all__ = ["ResultFanout"]

logger = logging.getLogger(__name__)


class ResultFanout:
    def __init__(self, settings: Settings, *, serde: Serde | None = None) -> None:
        self.settings = settings
        self.serde = serde or clients.serde(settings)
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}fanout"
        self.copied = 0
        self.failed = 0

    @property
    def needed(self) -> bool:
        t = self.settings.tenants
        return bool(t.results_topics or t.reply_to_patterns)

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        consumer = clients.consumer(self.settings.kafka, "fanout", self.group_id, **{"enable.auto.commit": False})
        producer = clients.producer(self.settings.kafka, "fanout")
        consumer.subscribe([self.topics.results], on_assign=lambda c, p: ready.set() if ready else None)
        try:
            while not stop.is_set():
                msgs = [m for m in consumer.consume(500, 0.2) if self._ok(m)]
                if not msgs:
                    continue
                errors: list[tuple[Message, InferenceResult, str, str]] = []
                for msg in msgs:
                    self._copy(producer, msg, errors)
                producer.flush(30)
                for msg, result, topic, error in errors:
                    self._dead_letter(producer, msg, result, topic, error)
                producer.flush(30)
                self._commit(consumer, msgs)
        finally:
            consumer.close()

    @staticmethod
    def _commit(consumer: Any, msgs: list[Message]) -> None:
        """Commit past ``msgs`` (every copy of them is acknowledged by now)."""
        positions: dict[tuple[str, int], int] = {}
        for msg in msgs:
            topic, partition, offset = message_coords(msg)
            positions[(topic, partition)] = max(positions.get((topic, partition), 0), offset + 1)
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=False)
        except KafkaException as exc:  # a rebalance: the next owner copies again (keyed, at least once)
            logger.warning("fanout commit failed: %s", exc)

    @staticmethod
    def _ok(msg: Message) -> bool:
        err = msg.error()
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            logger.warning("fanout consumer: %s", err)
        return err is None

    def _copy(self, producer: Any, msg: Message, errors: list[tuple[Message, InferenceResult, str, str]]) -> None:
        try:
            result = self.serde.decode(InferenceResult, msg.value())
        except SluiceError as exc:
            logger.error("fanout skipped an undecodable result: %s", exc)
            return
        for topic in self.topics.result_topics(self.settings.tenants, result.tenant, result.reply_to)[1:]:

            def delivered(
                err: KafkaError | None, _m: Message, topic: str = topic, result: InferenceResult = result
            ) -> None:
                if err is None:
                    self.copied += 1
                else:
                    errors.append((msg, result, topic, str(err)))

            try:
                producer.produce(topic, key=msg.key(), value=msg.value(), headers=msg.headers(), on_delivery=delivered)
            except KafkaException as exc:
                errors.append((msg, result, topic, str(exc)))
            producer.poll(0)

    def _dead_letter(self, producer: Any, msg: Message, result: InferenceResult, topic: str, error: str) -> None:
        self.failed += 1
        src, partition, offset = message_coords(msg)
        logger.warning("result %s not copied to %s: %s", result.request_id, topic, error)
        dl = DeadLetter.from_event(
            DeadLetterReason.REPLY_TO_REFUSED,
            f"result not delivered to {topic}: {error}",
            stage=Stage.DELIVERY,
            topic=src,
            partition=partition,
            offset=offset,
            original=msg.value() or b"",
        )
        dl.request_id, dl.tenant = result.request_id, result.tenant
        producer.produce(self.topics.dead_letter, key=result.request_id.encode(), value=self.serde.encode(dl))
