"""The committing consume loop every Sluice worker runs on (after Quix Streams' ``Application``).

One thread: take what the client fetched, hand each message to the :class:`Handler`, let it do
its cycle's work, serve delivery reports, commit. At least once, stated once, here: a message is
*taken* when the loop hands it over and *done* when the handler says its work exists (its records
acknowledged by the broker, its rows inserted, its webhook answered); a partition is committed
only up to its lowest taken message that is not done. A crash therefore redoes at most the work
that was taken and not done; nothing acknowledged downstream is skipped. Work handed to a
:class:`TrackedPublisher` attached to the loop is done when its records are acknowledged.

Rebalances (cooperative): before partitions go, the handler gives back what it holds of them,
acknowledged records are flushed and their offsets committed synchronously, so the next owner
starts where this one stopped. A graceful stop lets the handler drain, flushes and commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException, Message, TopicPartition

from core.kafka.coords import TP, message_coords, usable
from core.kafka.offsets import OffsetTracker
from core.kafka.publisher import TrackedPublisher
from core.kafka.transactions import TransactionalPublisher

__all__ = ["ConsumeLoop", "Handler"]

logger = logging.getLogger(__name__)


class Handler:
    """What a :class:`ConsumeLoop` drives. ``on_message`` is required; the hooks do nothing unless
    overridden."""

    def on_message(self, loop: ConsumeLoop, msg: Message) -> None:
        raise NotImplementedError

    def on_assign(self, loop: ConsumeLoop, tps: list[TP]) -> None:
        """Partitions were assigned to this consumer."""

    def on_revoke(self, loop: ConsumeLoop, tps: set[TP]) -> None:
        """Partitions are about to go: give back (or finish) what is held of them. The loop then
        flushes the publisher and commits them."""

    def wants(self, key: str) -> int:
        """Share mode: how many more records of ``key`` (a lane's key) the handler would take now."""
        return 1 << 30

    def on_cycle(self, loop: ConsumeLoop) -> bool:
        """After each intake: the cycle's own work. True if busy (the next fetch does not wait)."""
        return False

    def on_stop(self, loop: ConsumeLoop) -> None:
        """Graceful stop, before the final flush and commit: finish or give back what is held."""


class ConsumeLoop:
    def __init__(
        self,
        handler: Handler,
        consumer: Any,
        topics: list[str],
        *,
        publisher: TrackedPublisher | None = None,
        track: bool = True,
        commit: bool = True,
        commit_interval_s: float = 0.2,
        batch: int = 500,
        max_batches: int = 20,
        idle_wait_s: float = 0.1,
    ) -> None:
        """``consumer``: from the client factory (``core.clients.consumer``) or the stub broker.
        ``track=False``: the handler decides which messages it takes (:meth:`take`); others are
        fetched again after a seek. ``commit=False``: a reader whose position is not kept."""
        self.handler = handler
        self.consumer = consumer
        self.topics = topics
        self.publisher = publisher
        self.track = track
        self.commits = commit
        self.commit_interval_s = commit_interval_s
        self.batch = batch
        self.max_batches = max_batches
        self.idle_wait_s = idle_wait_s
        self.tracker = OffsetTracker()
        self.assigned: set[TP] = set()
        self.ready = threading.Event()
        self._subscribed = False
        self._busy = False
        self._last_commit = 0.0
        if publisher is not None and publisher.on_done is None:
            publisher.on_done = self._unit_done

    # -- for handlers ---------------------------------------------------------------------------
    def take(self, msg: Message) -> tuple[TP, int]:
        """Make ``msg`` this consumer's to finish (only needed with ``track=False``)."""
        topic, partition, offset = message_coords(msg)
        self.tracker.taken((topic, partition), offset)
        return (topic, partition), offset

    def done(self, tp: TP, offset: int) -> None:
        """The work of the message at ``offset`` exists: its position may be committed."""
        self.tracker.done(tp, offset)

    def _unit_done(self, unit: Any) -> None:
        tp, offset = unit
        self.tracker.done(tp, offset)

    def pause(self, tps: Iterable[TP]) -> None:
        parts = [TopicPartition(t, p) for t, p in tps]
        if parts:
            self.consumer.pause(parts)

    def resume(self, tps: Iterable[TP]) -> None:
        parts = [TopicPartition(t, p) for t, p in tps]
        if parts:
            self.consumer.resume(parts)

    def seek(self, tp: TP, offset: int) -> bool:
        """Fetch ``tp`` again from ``offset``; False if the client cannot (not yet fetching it)."""
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.debug("cannot seek %s to %d (%s)", tp, offset, exc)
            return False
        return True

    def commit(self, only: set[TP] | None = None, *, asynchronous: bool = True) -> None:
        """Commit every partition (or ``only`` these) up to its lowest message not done."""
        if not self.commits:
            return
        self._last_commit = time.monotonic()
        if isinstance(self.publisher, TransactionalPublisher):
            self.publisher.commit(self.consumer, self.tracker, only)
            return
        positions = self.tracker.committable(only)
        if not positions:
            return
        offsets = [TopicPartition(t, p, pos) for (t, p), pos in positions.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            # A commit lost to a rebalance only means re-delivery: every output is keyed by id.
            logger.warning("offset commit failed (%s); work may be redone", exc)
            return
        self.tracker.mark_committed(positions)

    # -- rebalance callbacks --------------------------------------------------------------------
    def _on_assign(self, consumer: Any, parts: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in parts]
        self.assigned |= set(tps)
        logger.info("assigned %s", sorted(tps))
        self.handler.on_assign(self, tps)
        self.ready.set()

    def _on_revoke(self, consumer: Any, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        try:
            self.handler.on_revoke(self, tps)
            if self.publisher is not None:
                self.publisher.flush(30)
        finally:
            self.commit(only=tps, asynchronous=False)
            self.tracker.forget(tps)
            self.assigned -= tps
        logger.info("revoked %s", sorted(tps))

    # -- driving --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._subscribed:
            self.consumer.subscribe(
                self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
            )
            self._subscribed = True

    def run_once(self, wait: float | None = None) -> int:
        """One cycle: intake (waiting up to ``wait``, default: none while busy, else
        ``idle_wait_s``), the handler's cycle, delivery reports, a commit when due. Returns how
        many messages were handed over."""
        self.start()
        if wait is None:
            wait = 0.0 if self._busy else self.idle_wait_s
        taken = self._intake(wait)
        self._busy = self.handler.on_cycle(self)
        if self.publisher is not None:
            self.publisher.poll()
        if time.monotonic() - self._last_commit >= self.commit_interval_s:
            self.commit()
        return taken

    def _fetch(self, wait: float) -> list[Message]:
        if wait <= 0 or self.batch < 2:
            msgs: list[Message] = self.consumer.consume(num_messages=self.batch, timeout=wait)
            return msgs
        # poll() returns as soon as one message is there; consume(n, timeout) would hold a message
        # that arrived until n are there or the whole wait has passed (latency on every idle hop).
        first = self.consumer.poll(wait)
        if first is None:
            return []
        return [first, *self.consumer.consume(num_messages=self.batch - 1, timeout=0)]

    def _intake(self, wait: float) -> int:
        taken = 0
        msgs = self._fetch(wait)
        for _ in range(self.max_batches):
            for msg in msgs:
                if not usable(msg, logger):
                    continue
                if self.track:
                    self.take(msg)
                self.handler.on_message(self, msg)
                taken += 1
            if len(msgs) < self.batch:
                break
            msgs = self.consumer.consume(num_messages=self.batch, timeout=0)
        return taken

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Cycle until ``stop`` is set, then stop gracefully (the handler drains, the publisher
        flushes, a final synchronous commit) and close the consumer."""
        try:
            while not stop.is_set():
                self.run_once()
                if ready is not None and self.ready.is_set():
                    ready.set()
            self.finish()
        finally:
            self.consumer.close()

    def finish(self) -> None:
        """The graceful part of a stop, without closing: drain, flush, commit."""
        self.handler.on_stop(self)
        if self.publisher is not None:
            self.publisher.flush(30)
        self.commit(asynchronous=False)
