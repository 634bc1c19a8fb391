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

from core import clients
from core.errors import SluiceError
from core.kafka import TopicReader
from core.settings import Settings
from core.topics import Topics
from schemas import RequestStatus, Serde

__all__ = ["CancelWatch"]

logger = logging.getLogger(__name__)


class CancelWatch:
    def __init__(self, settings: Settings, serde: Serde, max_ids: int = 1_000_000, consumer: object = None) -> None:
        """``consumer``: the stub broker's in tests; otherwise one from the client factory."""
        self.topic = Topics(settings.topic_prefix).cancellations
        self.serde = serde
        self.max_ids = max_ids
        self._ids: OrderedDict[str, str] = OrderedDict()
        if consumer is None:
            group = f"{settings.topic_prefix}cancel-watch-{uuid.uuid4().hex[:8]}"
            # A cancellation may take a tenth of a second to arrive; the consumer need not poll faster.
            consumer = clients.consumer(settings.kafka, "cancel-watch", group, **{"fetch.wait.max.ms": 100})
        self._reader = TopicReader(consumer, [self.topic])

    def poll(self) -> int:
        """Take in every cancellation fetched so far; returns how many were new."""
        new = 0
        for msg in self._reader.take():
            value = msg.value()
            if value is None:
                continue
            try:
                rec = self.serde.decode(RequestStatus, value)
            except SluiceError as exc:
                logger.warning("ignoring an undecodable cancellation: %s", exc)
                continue
            if rec.request_id not in self._ids:
                new += 1
            self._ids[rec.request_id] = rec.detail or "cancelled"
            if len(self._ids) > self.max_ids:
                self._ids.popitem(last=False)
        return new

    def reason(self, request_id: str) -> str | None:
        return self._ids.get(request_id)

    def close(self) -> None:
        self._reader.close()
