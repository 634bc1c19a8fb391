"""Per-record acknowledgement over a Kafka share group (KIP-932, "queues for Kafka").

The second consumption mode of the runtime, for work that is not bound to partitions: any number
of consumers share a topic's partitions, each record is acquired under a time-limited lock by one
of them and acknowledged on its own — ``ACCEPT`` once its work exists, ``RELEASE`` to hand it back
untouched (another consumer gets it at once, nothing is re-produced), ``REJECT`` to drop it for
good (after its dead letter is written). A record whose lock runs out, or whose consumer dies, is
delivered again; the broker counts deliveries.

``ShareLoop`` drives the same :class:`Handler` as :class:`ConsumeLoop`, with the same calls for
the handler (``take``, ``done``, and a publisher whose acknowledged units are done), plus
``release`` and ``reject_when_done``. Intake is asked for, not pushed: a lane (one share consumer
over one set of topics) is polled only while the handler ``wants`` more of its key, because a
share consumer must acknowledge every record of a poll before it may poll again — several lanes
per key keep one long-running record from stopping the intake.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import AcknowledgeType, KafkaException, Message
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource  # type: ignore[attr-defined]

from core.errors import BrokerError
from core.kafka.coords import TP, message_coords, usable
from core.kafka.loop import Handler
from core.kafka.publisher import TrackedPublisher

__all__ = ["Lane", "ShareGroupConfig", "ShareLoop", "prepare_share_group"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShareGroupConfig:
    """What a share group was set to (the broker may cap what was asked)."""

    group: str
    lock_duration_ms: int
    delivery_limit: int


def _broker_configs(admin: Any, timeout: float) -> dict[str, str]:
    brokers = admin.list_topics(timeout=timeout).brokers
    if not brokers:
        return {}
    resource = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(brokers))))
    (future,) = admin.describe_configs([resource]).values()
    return {k: v.value for k, v in future.result(timeout=timeout).items() if v.value is not None}


def prepare_share_group(
    admin: Any, group: str, *, lock_duration_ms: int, delivery_limit: int, timeout: float = 15.0
) -> ShareGroupConfig | str:
    """Set up a share group before its first member joins: start at the earliest record (a new
    group must not skip what was queued before it), lock records for ``lock_duration_ms`` and
    allow ``delivery_limit`` deliveries, both within the broker's bounds (a value outside them is
    capped, with a warning). Returns what was set, or why the broker has no share groups."""
    try:
        broker = _broker_configs(admin, timeout)
    except (KafkaException, ValueError) as exc:
        return f"its configuration cannot be read ({exc})"
    if "group.share.max.record.lock.duration.ms" not in broker:
        return "it lists no share group settings (Apache Kafka 4.2 or newer has share groups)"
    lock_max = int(broker["group.share.max.record.lock.duration.ms"])
    lock_min = int(broker.get("group.share.min.record.lock.duration.ms", "0"))
    lock = min(max(lock_duration_ms, lock_min), lock_max)
    if lock != lock_duration_ms:
        logger.warning(
            "share group %s: record lock %d ms is outside the broker's bounds [%d, %d] "
            "(group.share.min/max.record.lock.duration.ms); using %d ms: a request running longer "
            "may be delivered to a second consumer",
            group,
            lock_duration_ms,
            lock_min,
            lock_max,
            lock,
        )
    limit_min = int(broker.get("group.share.min.delivery.count.limit", "2"))
    limit_max = int(broker.get("group.share.max.delivery.count.limit", "10"))
    limit = min(max(delivery_limit, limit_min), limit_max)
    entries = [
        ("share.auto.offset.reset", "earliest"),
        ("share.record.lock.duration.ms", str(lock)),
        ("share.delivery.count.limit", str(limit)),
    ]
    resource = ConfigResource(
        ConfigResource.Type.GROUP,
        group,
        incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in entries],
    )
    try:
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(timeout=timeout)
    except (KafkaException, ValueError, TypeError) as exc:
        return f"it refused the share group's configuration ({exc.args[0] if exc.args else exc})"
    return ShareGroupConfig(group, lock, limit)


@dataclass
class Lane:
    """One share consumer, its topics, and the records of its last poll not yet acknowledged."""

    key: str
    consumer: Any
    held: set[tuple[TP, int]] = field(default_factory=set)
    dirty: bool = False


class ShareLoop:
    def __init__(
        self,
        handler: Handler,
        lanes: Iterable[tuple[str, list[str], Callable[[], Any]]],
        *,
        publisher: TrackedPublisher | None = None,
        commit_interval_s: float = 0.2,
        idle_wait_s: float = 0.05,
    ) -> None:
        """``lanes``: (key, topics, make_consumer) each; keys are polled in the order given, so
        higher priorities come first."""
        self.handler = handler
        self.publisher = publisher
        self.commit_interval_s = commit_interval_s
        self.idle_wait_s = idle_wait_s
        self.lanes: list[Lane] = []
        for key, topics, make in lanes:
            consumer = make()
            consumer.subscribe(topics)
            self.lanes.append(Lane(key, consumer))
        self.assigned: set[TP] = set()  # no partition is a share consumer's own
        self.ready = threading.Event()
        self.ready.set()
        self.acknowledged: dict[str, int] = {"accept": 0, "release": 0, "reject": 0}
        self._held: dict[tuple[TP, int], Lane] = {}
        self._verdicts: dict[tuple[TP, int], AcknowledgeType] = {}
        self._busy = False
        self._last_commit = 0.0
        if publisher is not None and publisher.on_done is None:
            publisher.on_done = self._unit_done

    # -- for handlers ---------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Records acquired and not yet acknowledged (what a crash here would hand back)."""
        return len(self._held)

    def take(self, msg: Message) -> tuple[TP, int]:
        topic, partition, offset = message_coords(msg)
        return (topic, partition), offset

    def done(self, tp: TP, offset: int) -> None:
        """The record's work exists: ACCEPT (or REJECT, if so marked)."""
        self._ack(tp, offset, self._verdicts.pop((tp, offset), AcknowledgeType.ACCEPT))

    def release(self, tp: TP, offset: int) -> None:
        """Hand the record back untouched: another consumer gets it (its delivery count grows)."""
        self._verdicts.pop((tp, offset), None)
        self._ack(tp, offset, AcknowledgeType.RELEASE)

    def reject_when_done(self, tp: TP, offset: int) -> None:
        """When its records (a dead letter) are acknowledged, drop the record for good."""
        self._verdicts[(tp, offset)] = AcknowledgeType.REJECT

    def _unit_done(self, unit: Any) -> None:
        tp, offset = unit
        self.done(tp, offset)

    def _ack(self, tp: TP, offset: int, kind: AcknowledgeType) -> None:
        lane = self._held.pop((tp, offset), None)
        if lane is None:
            return
        lane.held.discard((tp, offset))
        lane.consumer.acknowledge_offset(tp[0], tp[1], offset, kind)
        lane.dirty = True
        name = {AcknowledgeType.ACCEPT: "accept", AcknowledgeType.RELEASE: "release"}.get(kind, "reject")
        self.acknowledged[name] += 1

    def pause(self, tps: Iterable[TP]) -> None:
        """Nothing to pause: intake is asked for (``Handler.wants``)."""

    def resume(self, tps: Iterable[TP]) -> None:
        """Nothing to resume: intake is asked for (``Handler.wants``)."""

    def seek(self, tp: TP, offset: int) -> bool:
        return False

    def commit(self, only: set[TP] | None = None, *, asynchronous: bool = True) -> None:
        """Send the acknowledgements made since the last commit."""
        self._last_commit = time.monotonic()
        for lane in self.lanes:
            if not lane.dirty:
                # Sent now, not with the lane's next poll: a lane its priority does not want
                # polls again only later, and its records' locks would run out meanwhile.
                continue
            lane.dirty = False
            try:
                if asynchronous:
                    lane.consumer.commit_async()
                else:
                    lane.consumer.commit_sync(30)
            except KafkaException as exc:
                # Not acknowledged: the records are delivered again when their locks run out.
                logger.warning("acknowledgements not committed (%s); records may be delivered again", exc)

    # -- driving --------------------------------------------------------------------------------
    def start(self) -> None:
        """Lanes subscribe when built."""

    def run_once(self, wait: float | None = None) -> int:
        if wait is None:
            wait = 0.0 if self._busy else self.idle_wait_s
        taken = 0
        waited = False
        for lane in self.lanes:
            if lane.held or self.handler.wants(lane.key) <= 0:
                continue
            timeout = 0.0 if (taken or waited) else wait
            waited = waited or timeout > 0
            try:
                msgs = lane.consumer.poll(timeout)
            except KafkaException as exc:
                raise BrokerError(f"share consumer poll failed: {exc}") from exc
            for msg in msgs:
                if not usable(msg, logger):
                    continue
                unit = self.take(msg)
                self._held[unit] = lane
                lane.held.add(unit)
                self.handler.on_message(self, msg)  # type: ignore[arg-type]
                taken += 1
        if not taken and not waited and wait > 0:
            time.sleep(min(wait, 0.05))  # every lane is full or not wanted: do not spin
        self._busy = self.handler.on_cycle(self)  # type: ignore[arg-type]
        if self.publisher is not None:
            self.publisher.poll()
        if time.monotonic() - self._last_commit >= self.commit_interval_s:
            self.commit()
        return taken

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                self.run_once()
            self.finish()
        finally:
            self.close()

    def finish(self) -> None:
        """Graceful stop: the handler finishes or releases what it holds; acknowledgements sent."""
        self.handler.on_stop(self)  # type: ignore[arg-type]
        if self.publisher is not None:
            self.publisher.flush(30)
        for unit in list(self._held):
            # Whatever the handler left: back to the group, nothing lost.
            self.release(*unit)
        self.commit(asynchronous=False)

    def close(self) -> None:
        for lane in self.lanes:
            try:
                lane.consumer.close()
            except KafkaException as exc:
                logger.warning("share consumer close: %s", exc)
