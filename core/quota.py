"""Enqueued-token quotas per tenant: the tokens (prompt estimate + ``max_tokens``) of everything a
tenant has queued or running, against ``SLUICE_TENANTS__TOKEN_QUOTAS``.

The router admits a request of a tenant with a quota only if its tokens fit, and writes a
:class:`~schemas.QuotaEntry` for it to the compacted quota-ledger topic; the request's result (any
outcome: succeeded, failed, cancelled, expired) releases it with a tombstone. The topic is the
state: a router rebuilds its :class:`QuotaLedger` from it at start (read up to a marker it writes
itself, so no high watermark is trusted) and keeps following it, as the gateway does to refuse
over-quota calls with 429 before they are published.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from typing import Any

from core import clients
from core.errors import BrokerError, SluiceError
from core.kafka import TopicReader
from core.settings import Settings
from core.topics import Topics
from schemas import DeadLetterReason, InferenceRequest, PipelineRejection, QuotaEntry, Serde

__all__ = ["QuotaLedger", "follow_ledger", "load_ledger"]

logger = logging.getLogger(__name__)

_MARKER = "marker-"


class QuotaLedger:
    def __init__(self, quotas: dict[str, int]) -> None:
        self.quotas = dict(quotas)
        self._entries: dict[str, tuple[str, int]] = {}
        self._used: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.quotas)

    def used(self, tenant: str) -> int:
        with self._lock:
            return self._used[tenant]

    def usage(self) -> dict[str, int]:
        """Tokens held per tenant with a quota."""
        with self._lock:
            return {t: self._used[t] for t in self.quotas}

    def check(self, request: InferenceRequest) -> None:
        """Raise a ``quota_exceeded`` rejection if ``request`` does not fit its tenant's quota."""
        quota = self.quotas.get(request.tenant)
        if quota is None:
            return
        tokens = request.enqueued_tokens()
        with self._lock:
            if request.request_id in self._entries:
                return  # already counted (a redelivery)
            used = self._used[request.tenant]
        if used + tokens > quota:
            raise PipelineRejection(
                DeadLetterReason.QUOTA_EXCEEDED,
                f"tenant {request.tenant!r} has {used} tokens queued or running; this request's {tokens} "
                f"would pass its quota of {quota}",
            )

    def admit(self, request: InferenceRequest) -> QuotaEntry | None:
        """Count ``request`` against its tenant's quota (raising if it does not fit); the entry to
        write to the ledger topic, or None when there is nothing to write."""
        if request.tenant not in self.quotas:
            return None
        self.check(request)
        entry = QuotaEntry.for_request(request)
        return entry if self._add(entry) else None

    def _add(self, entry: QuotaEntry) -> bool:
        with self._lock:
            if entry.request_id in self._entries:
                return False
            self._entries[entry.request_id] = (entry.tenant, entry.tokens)
            self._used[entry.tenant] += entry.tokens
            return True

    def release(self, request_id: str) -> bool:
        with self._lock:
            held = self._entries.pop(request_id, None)
            if held is None:
                return False
            tenant, tokens = held
            self._used[tenant] -= tokens
            if self._used[tenant] <= 0:
                del self._used[tenant]
            return True

    def apply(self, request_id: str, entry: QuotaEntry | None) -> None:
        """A record read from the ledger topic: an entry, or a tombstone (None)."""
        if request_id.startswith(_MARKER):
            return
        if entry is None:
            self.release(request_id)
        else:
            self._add(entry)


def _apply(ledger: QuotaLedger, serde: Serde, msg: Any) -> str:
    key = (msg.key() or b"").decode(errors="replace")
    value = msg.value()
    try:
        ledger.apply(key, None if value is None else serde.decode(QuotaEntry, value))
    except SluiceError as exc:
        # One unreadable record must not stop the ledger (and with it every quota check) for good.
        logger.error("quota ledger record %s skipped: %s", key, exc)
    return key


def load_ledger(settings: Settings, serde: Serde, ledger: QuotaLedger, *, timeout: float = 60.0) -> TopicReader:
    """Rebuild ``ledger`` from the whole ledger topic; returns the reader, positioned after what
    was applied, for :func:`follow_ledger`. The end is where a marker written now to each partition
    is read back: a positive signal, independent of the broker's high watermarks."""
    topic = Topics(settings.topic_prefix).quota_ledger
    reader = TopicReader(
        clients.consumer(settings.kafka, "quota", f"{settings.topic_prefix}quota-{uuid.uuid4().hex[:8]}"), [topic]
    )
    producer = clients.producer(settings.kafka, "quota")
    marker = f"{_MARKER}{uuid.uuid4().hex}"
    partitions = reader.partitions(topic)
    for p in partitions:
        producer.produce(
            topic, key=marker, value=serde.encode(QuotaEntry(request_id=marker, tenant="", tokens=0)), partition=p
        )
    if producer.flush(timeout) != 0:
        raise BrokerError(f"cannot write to {topic}")
    seen: set[int] = set()
    applied = 0
    give_up = time.monotonic() + timeout
    while len(seen) < len(partitions):
        for msg in reader.take(wait=0.2):
            partition = msg.partition()
            if _apply(ledger, serde, msg) == marker and partition is not None:
                seen.add(partition)
            applied += 1
        if time.monotonic() > give_up:
            raise BrokerError(f"the quota ledger {topic} was not read to its end within {timeout:.0f}s")
    for p in partitions:
        producer.produce(topic, key=marker, value=None, partition=p)  # compacted away
    producer.flush(timeout)
    logger.info("quota ledger rebuilt from %d record(s): %s", applied, ledger.usage())
    return reader


def follow_ledger(reader: TopicReader, serde: Serde, ledger: QuotaLedger, stop: threading.Event) -> None:
    """Keep applying what is written to the ledger topic (other routers' admissions, releases)."""
    try:
        while not stop.is_set():
            for msg in reader.take(wait=0.2):
                _apply(ledger, serde, msg)
    finally:
        reader.close()
