"""Faust's aiokafka transport with a configurable fetch wait and a correct seek after assignment.

Faust hard-codes ``fetch_max_wait_ms=1500`` for its consumers. A broker that answers a fetch only
when the wait expires (rather than as soon as data arrives) then adds up to that much latency per
hop; a short wait bounds it. On Apache Kafka the setting only changes how long an idle fetch
waits, so it is harmless there.

The seek: after an assignment Faust seeks every stream partition to its committed offset through
aiokafka's ``seek_to_committed``, which seeks only where that offset is above 0. A partition with
no committed offset (a router killed before its first commit there) or one committed at 0 kept
the position its fetcher had reached during table recovery, while the events fetched in that
window were dropped with the old buffers: the agent never saw them and the partition stalled
until the next rebalance (found on Apache Kafka by the table-recovery test; the events were not
lost, as nothing past them was committed). Every partition is now sought: to its committed offset
when there is one, else to its beginning (``auto_offset_reset=earliest``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import faust
from faust import streams as faust_streams
from faust.transport.drivers import aiokafka as faust_aiokafka

from core.errors import BrokerError

__all__ = ["App", "acting_on"]

logger = logging.getLogger(__name__)


@contextmanager
def acting_on(event: Any) -> Iterator[None]:
    """Make ``event`` Faust's current event: a table write goes to the changelog partition of the
    current event, and in a batch taken with ``take_events`` that is the batch's last event, not
    the one being handled."""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):  # type: ignore[misc]
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor argument here and hands it to its fetcher on start.
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)
        return consumer

    async def seek_to_committed(self) -> Mapping[Any, int]:
        # Table changelogs are positioned by Faust's recovery itself (and never committed).
        changelogs = frozenset(getattr(self.app.tables, "changelog_topics", ()))
        result: Mapping[Any, int] = await self.call_thread(_seek_every_partition, self._ensure_consumer(), changelogs)
        return result


async def _seek_every_partition(consumer: Any, changelogs: frozenset[str]) -> Mapping[Any, int]:
    committed: Mapping[Any, int] = await consumer.seek_to_committed()
    fresh = []
    for tp, offset in committed.items():
        if tp.topic in changelogs:
            continue
        if offset is None or offset < 0:
            fresh.append(tp)
        elif offset == 0:
            consumer.seek(tp, 0)
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return committed


class _Consumer(faust_aiokafka.Consumer):  # type: ignore[misc]
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _commit(self, offsets: Mapping[Any, int]) -> bool:
        # Faust has flushed its own producer by now; the agents' records went out through the
        # librdkafka sender, so they too must be on the broker before any offset moves.
        sender = getattr(self.app, "sender", None)
        if sender is not None:
            try:
                await asyncio.to_thread(sender.settle)
            except BrokerError as exc:
                # Stop at once, committing nothing: a restart handles again every event whose
                # records were not delivered (at-least-once). Raising here would leave Faust
                # running with a crashed commit task.
                logger.critical("router stopping without committing offsets: %s", exc)
                os._exit(70)
        result: bool = await super()._commit(offsets)
        return result


class _Transport(faust_aiokafka.Transport):  # type: ignore[misc]
    Consumer = _Consumer


class App(faust.App):  # type: ignore[misc]
    """``faust.App`` whose consumers wait at most ``fetch_max_wait_ms`` per fetch."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.pipeline: Any = None
        # The agents' librdkafka producer (stream_processors.sender), settled before each commit.
        self.sender: Any = None

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self, loop=self.loop)
