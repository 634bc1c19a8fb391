"""Which requests were cancelled: a local view of the compacted cancellations topic.

Every GPU consumer reads the whole topic (assigned, not in a group, so each consumer sees every
cancellation) and checks it just before a batch runs: a cancelled request that has not started
is skipped. The view is bounded (oldest cancellations forgotten first): a cancellation only
matters while its request can still be waiting.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from core import clients
from core.errors import BrokerError, SluiceError
from core.settings import Settings
from core.topics import Topics
from schemas import RequestStatus, Serde

__all__ = ["CancelWatch"]

logger = logging.getLogger(__name__)


class CancelWatch:
    def __init__(self, settings: Settings, serde: Serde, max_ids: int = 1_000_000) -> None:
        self.topic = Topics(settings.topic_prefix).cancellations
        self.serde = serde
        self.max_ids = max_ids
        self._ids: OrderedDict[str, str] = OrderedDict()
        group = f"{settings.topic_prefix}cancel-watch-{uuid.uuid4().hex[:8]}"
        # A cancellation may take a tenth of a second to arrive; the consumer need not poll faster.
        self._consumer = clients.consumer(settings.kafka, "cancel-watch", group, **{"fetch.wait.max.ms": 100})
        try:
            meta = self._consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        except KafkaException as exc:
            raise BrokerError(f"cannot read {self.topic}: {exc}") from exc
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions])

    def poll(self) -> int:
        """Take in every cancellation fetched so far; returns how many were new."""
        new = 0
        while True:
            msgs = self._consumer.consume(1000, timeout=0)
            if not msgs:
                return new
            for msg in msgs:
                if msg.error() is not None or msg.value() is None:
                    continue
                try:
                    rec = self.serde.decode(RequestStatus, msg.value())
                except SluiceError as exc:
                    logger.warning("ignoring an undecodable cancellation: %s", exc)
                    continue
                if rec.request_id not in self._ids:
                    new += 1
                self._ids[rec.request_id] = rec.detail or "cancelled"
                if len(self._ids) > self.max_ids:
                    self._ids.popitem(last=False)

    def reason(self, request_id: str) -> str | None:
        return self._ids.get(request_id)

    def close(self) -> None:
        self._consumer.close()
