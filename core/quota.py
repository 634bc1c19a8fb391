"""Enqueued-token quotas per tenant (and per API key): the tokens (prompt estimate + ``max_tokens``) of everything a
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
from schemas import (
    QUOTA_KEY,
    QUOTA_KEY_TOKENS,
    DeadLetterReason,
    InferenceRequest,
    PipelineRejection,
    QuotaEntry,
    Serde,
)

__all__ = ["QuotaLedger", "follow_ledger", "key_quota", "ledger_wanted", "load_ledger"]

logger = logging.getLogger(__name__)

_MARKER = "marker-"


def key_quota(request: InferenceRequest) -> tuple[str, int] | None:
    """The API key a request came with and that key's token quota (set by the gateway), if any."""
    key, limit = request.metadata.get(QUOTA_KEY), request.metadata.get(QUOTA_KEY_TOKENS)
    if not key or not limit or not limit.isdigit():
        return None
    return key, int(limit)


class QuotaLedger:
    def __init__(self, quotas: dict[str, int]) -> None:
        self.quotas = dict(quotas)
        self._entries: dict[str, tuple[str, int, str | None]] = {}
        self._used: Counter[str] = Counter()
        self._used_by_key: Counter[str] = Counter()
        self._key_quotas: dict[str, int] = {}  # the last quota seen per key (for the gauges)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.quotas)

    def used(self, tenant: str) -> int:
        with self._lock:
            return self._used[tenant]

    def used_by_key(self, key: str) -> int:
        with self._lock:
            return self._used_by_key[key]

    def usage(self) -> dict[str, int]:
        """Tokens held per tenant with a quota."""
        with self._lock:
            return {t: self._used[t] for t in self.quotas}

    def key_usage(self) -> dict[str, tuple[int, int]]:
        """(tokens held, quota) per API key with a quota seen by this ledger."""
        with self._lock:
            return {k: (self._used_by_key[k], q) for k, q in self._key_quotas.items()}

    def check(self, request: InferenceRequest) -> None:
        """Raise a ``quota_exceeded`` rejection if ``request`` does not fit its tenant's quota or
        its API key's."""
        quota = self.quotas.get(request.tenant)
        keyed = key_quota(request)
        if quota is None and keyed is None:
            return
        tokens = request.enqueued_tokens()
        with self._lock:
            if request.request_id in self._entries:
                return  # already counted (a redelivery)
            used = self._used[request.tenant]
            key_used = self._used_by_key[keyed[0]] if keyed is not None else 0
        if quota is not None and used + tokens > quota:
            raise PipelineRejection(
                DeadLetterReason.QUOTA_EXCEEDED,
                f"tenant {request.tenant!r} has {used} tokens queued or running; this request's {tokens} "
                f"would pass its quota of {quota}",
            )
        if keyed is not None and key_used + tokens > keyed[1]:
            raise PipelineRejection(
                DeadLetterReason.QUOTA_EXCEEDED,
                f"API key {keyed[0]} has {key_used} tokens queued or running; this request's {tokens} "
                f"would pass its quota of {keyed[1]}",
            )

    def admit(self, request: InferenceRequest) -> QuotaEntry | None:
        """Count ``request`` against its tenant's and its API key's quota (raising if it does not
        fit); the entry to write to the ledger topic, or None when there is nothing to write."""
        keyed = key_quota(request)
        if request.tenant not in self.quotas and keyed is None:
            return None
        self.check(request)
        if keyed is not None:
            with self._lock:
                self._key_quotas[keyed[0]] = keyed[1]
        entry = QuotaEntry.for_request(request)
        return entry if self._add(entry) else None

    def _add(self, entry: QuotaEntry) -> bool:
        with self._lock:
            if entry.request_id in self._entries:
                return False
            self._entries[entry.request_id] = (entry.tenant, entry.tokens, entry.key)
            self._used[entry.tenant] += entry.tokens
            if entry.key is not None:
                self._used_by_key[entry.key] += entry.tokens
            return True

    def release(self, request_id: str) -> bool:
        with self._lock:
            held = self._entries.pop(request_id, None)
            if held is None:
                return False
            tenant, tokens, key = held
            self._used[tenant] -= tokens
            if self._used[tenant] <= 0:
                del self._used[tenant]
            if key is not None:
                self._used_by_key[key] -= tokens
                if self._used_by_key[key] <= 0:
                    del self._used_by_key[key]
            return True

    def apply(self, request_id: str, entry: QuotaEntry | None) -> None:
        """A record read from the ledger topic: an entry, or a tombstone (None)."""
        if request_id.startswith(_MARKER):
            return
        if entry is None:
            self.release(request_id)
        else:
            self._add(entry)


def ledger_wanted(settings: Settings) -> bool:
    """Whether routers and gateways keep the ledger: a tenant has a quota, or API keys may."""
    return bool(settings.tenants.token_quotas) or settings.tenants.key_quotas


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
