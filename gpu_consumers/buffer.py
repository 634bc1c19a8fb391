"""Bounded per-priority buffers of fetched requests, and the order they go to the engine.

Requests go to the engine from what this consumer has fetched and buffered (never from broker
lag, which some brokers report wrongly).

* **Priority, with aging**: high first, then normal, then low. A priority whose oldest request has
  waited longer than ``aging_s`` since it was created counts one tier higher per ``aging_s``, up
  to normal, so normal never starves low and high always outranks what waits.
* **Deadlines, by slack**: within a priority each request has a due time, its deadline less its
  expected service time (``max_tokens`` at the model's measured per-sequence decode speed); a
  request without a deadline is due ``patience_s`` after it was created, so among themselves such
  requests keep their arrival order, and a request that can still make a tight deadline goes
  before one with hours to spare.
* **Tenants, by fair share**: within a priority, tenants take turns by deficit round robin on
  tokens (prompt estimate + ``max_tokens``), each tenant's quantum scaled by its weight (default
  1; a zero-weight tenant runs only when no other tenant of that priority waits), so one tenant's
  backlog cannot starve another's work of the same priority, and a tenant alone gets every slot.
  Within a tenant, earliest due first. A request due within ``urgent_s`` (about to miss its
  deadline, but still able to make it) skips the round: it goes first, earliest due first.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from datetime import datetime

from core.headers import Headers
from schemas import InferenceRequest, Priority

__all__ = ["Buffered", "PriorityBuffer", "token_cost"]

# The highest rank aging reaches: one below high.
AGED_CEILING = Priority.HIGH.rank + 1
# Deficit round robin quantum: tokens a weight-1 tenant may take per turn.
QUANTUM = 1024


class Buffered:
    """A fetched request waiting for (or in) the engine.

    What the order needs (priority, tenant, times, token cost) is copied out of the request, so
    that a deep buffer can drop the decoded request (:meth:`shed`) and keep only its bytes: a
    decoded request costs about fifteen times its Avro encoding. It is decoded again when it
    is taken for the engine or written about."""

    __slots__ = (
        "_decode",
        "_request",
        "arrived",
        "cost",
        "created_at",
        "deadline",
        "due",
        "flagged",
        "headers",
        "max_tokens",
        "offset",
        "partition",
        "preempted",
        "rank",
        "request_id",
        "spent_ms",
        "tenant",
        "timestamp_ms",
        "topic",
        "value",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes,
        request: InferenceRequest,
        arrived: float,  # monotonic time it entered the buffer
        timestamp_ms: int | None = None,  # the record's timestamp (part of a dead letter's id)
        headers: Headers | None = None,
        *,
        spent_ms: float = 0.0,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.value = value
        self.arrived = arrived
        self.timestamp_ms = timestamp_ms
        # Its trace context, tenant and correlation id: copied onto everything written about it.
        self.headers: Headers = headers if headers is not None else []
        # When it should start to make its deadline (or its patience), in epoch seconds; set on add.
        self.due = 0.0
        # Engine time of runs preempted for higher priority (billed with the run that finishes
        # it), and how many there were: a request is preempted at most once.
        self.spent_ms = spent_ms
        self.preempted = 0
        self.request_id = request.request_id
        self.tenant = request.tenant
        self.rank = request.priority.rank
        self.created_at = request.created_at
        self.deadline = request.deadline
        self.max_tokens = request.max_tokens
        self.cost = request.enqueued_tokens()
        # The router already said it is at risk (and acted on its policy).
        self.flagged = "at_risk" in request.metadata
        self._request: InferenceRequest | None = request
        self._decode: Callable[[bytes], InferenceRequest] | None = None

    @property
    def request(self) -> InferenceRequest:
        if self._request is None:
            assert self._decode is not None
            self._request = self._decode(self.value)
        return self._request

    def shed(self, decode: Callable[[bytes], InferenceRequest]) -> None:
        """Drop the decoded request; ``decode`` makes it again from the bytes when needed."""
        self._decode = decode
        self._request = None

    @property
    def decoded(self) -> bool:
        return self._request is not None


def token_cost(request: InferenceRequest) -> int:
    return request.enqueued_tokens()


class _Tier:
    """One priority's requests: every tenant's in due order, and the round between tenants."""

    def __init__(self) -> None:
        self.items: dict[int, Buffered] = {}  # by sequence number: arrival order
        self.heaps: dict[str, list[tuple[float, int]]] = {}  # tenant -> (due, seq)
        self.ring: deque[str] = deque()  # tenants with requests, in turn order
        self.deficit: dict[str, float] = {}
        # Whether ring[0] has had its quantum for the turn it is on.
        self.granted = False
        self.bytes = 0  # encoded size of what waits here

    def __len__(self) -> int:
        return len(self.items)

    def add(self, seq: int, item: Buffered, tenant: str, *, first: bool = False) -> None:
        self.items = {seq: item, **self.items} if first else self.items
        self.items[seq] = item
        self.bytes += len(item.value)
        if tenant not in self.heaps:
            self.heaps[tenant] = []
            self.ring.append(tenant)
            self.deficit[tenant] = 0.0
        heapq.heappush(self.heaps[tenant], (item.due, seq))

    def oldest(self) -> Buffered | None:
        return next(iter(self.items.values()), None)

    def _pop(self, tenant: str) -> Buffered:
        _, seq = heapq.heappop(self.heaps[tenant])
        if not self.heaps[tenant]:
            # A tenant that leaves loses its credit (deficit round robin).
            del self.heaps[tenant], self.deficit[tenant]
            if self.ring and self.ring[0] == tenant:
                self.granted = False
            self.ring.remove(tenant)
        item = self.items.pop(seq)
        self.bytes -= len(item.value)
        return item

    def take(self, now: float, urgent_s: float, weight: Callable[[str], float]) -> Buffered:
        heads = {t: h[0] for t, h in self.heaps.items()}
        # Urgent: due now or within urgent_s. One already past due cannot make its deadline any
        # more and gets no precedence (it would only take a slot from one that still can).
        urgent = [t for t, (due, _) in heads.items() if now <= due <= now + urgent_s]
        if urgent:
            return self._pop(min(urgent, key=lambda t: heads[t]))
        weights = {t: max(0.0, weight(t)) for t in self.ring}
        if not any(weights.values()):
            # Only zero-weight tenants wait: they run, oldest first.
            return self._pop(min(heads, key=lambda t: heads[t][1]))
        while True:
            tenant = self.ring[0]
            if not self.granted:
                # A tenant's turn starts with its quantum; a tenant without weight passes.
                self.deficit[tenant] += QUANTUM * weights[tenant]
                self.granted = True
            head = self.items[heads[tenant][1]]
            cost = head.cost
            if weights[tenant] > 0 and self.deficit[tenant] >= cost:
                self.deficit[tenant] -= cost
                if len(self.heaps[tenant]) == 1:
                    self.granted = False  # it leaves: the next tenant's turn
                return self._pop(tenant)
            # Its credit is spent: the next tenant's turn (credit carries over, so a request
            # costlier than one quantum runs after a few turns).
            self.ring.rotate(-1)
            self.granted = False

    def rebuild(self, keep: Callable[[Buffered], bool]) -> list[Buffered]:
        """Remove every item ``keep`` refuses; returns them."""
        gone = [i for i in self.items.values() if not keep(i)]
        if not gone:
            return []
        kept = [(s, i) for s, i in self.items.items() if keep(i)]
        deficit, ring = self.deficit, list(self.ring)
        tenants = {seq: t for t, heap in self.heaps.items() for _, seq in heap}
        self.items, self.heaps, self.ring, self.deficit, self.granted = {}, {}, deque(), {}, False
        self.bytes = 0
        for seq, item in kept:
            self.add(seq, item, tenants[seq])
        # Turn order and credit carry over for the tenants still waiting.
        self.ring = deque([t for t in ring if t in self.heaps] + [t for t in self.ring if t not in ring])
        self.deficit.update({t: d for t, d in deficit.items() if t in self.deficit})
        return gone


class PriorityBuffer:
    def __init__(
        self,
        capacity_per_priority: int,
        aging_s: float,
        *,
        max_bytes_per_priority: int | None = None,
        service_s: Callable[[Buffered], float] | None = None,
        weight: Callable[[str], float] | None = None,
        patience_s: float = 600.0,
        urgent_s: float = 0.0,
        deadlines: bool = True,
        fair: bool = True,
        decode: Callable[[bytes], InferenceRequest] | None = None,
        decoded_per_priority: int = 0,
    ) -> None:
        """``service_s``: a request's expected service time (none: 0); ``weight``: a tenant's
        fair-share weight (none: 1 each); ``urgent_s``: how close to its due time a request skips
        the tenants' round. ``deadlines`` / ``fair`` off: arrival order / one shared queue (the
        order before either existed, kept for comparison). ``decode``: with it, a priority's requests
        beyond its first ``decoded_per_priority`` are kept as bytes until taken."""
        self.capacity = capacity_per_priority
        self.max_bytes = max_bytes_per_priority
        self.aging_s = aging_s
        self.service_s = service_s or (lambda r: 0.0)
        self.weight = weight or (lambda t: 1.0)
        self.patience_s = patience_s
        self.urgent_s = urgent_s
        self.deadlines = deadlines
        self.fair = fair
        self.decode = decode
        self.decoded_per_priority = decoded_per_priority
        self._tiers: dict[int, _Tier] = {p.rank: _Tier() for p in Priority}
        self._seq = itertools.count()
        self._requeued = itertools.count(1)  # negative sequence numbers: ahead of every arrival

    def __len__(self) -> int:
        return sum(len(t) for t in self._tiers.values())

    def due(self, item: Buffered) -> float:
        if not self.deadlines:
            return 0.0  # ties: arrival order
        if item.deadline is not None:
            return item.deadline.timestamp() - self.service_s(item)
        return item.created_at.timestamp() + self.patience_s

    def add(self, item: Buffered) -> None:
        item.due = self.due(item)
        tier = self._tiers[item.rank]
        if self.decode is not None and len(tier) >= self.decoded_per_priority:
            item.shed(self.decode)
        tier.add(next(self._seq), item, item.tenant if self.fair else "")

    def requeue(self, item: Buffered) -> None:
        """Put back a request taken from here (preempted in the engine) at the head of its
        priority: before everything that arrived after it, its tenant refunded its tokens."""
        tenant = item.tenant if self.fair else ""
        tier = self._tiers[item.rank]
        if tenant in tier.deficit:
            tier.deficit[tenant] += item.cost
        tier.add(-next(self._requeued), item, tenant, first=True)

    def depth(self, rank: int) -> int:
        return len(self._tiers[rank])

    def full(self, rank: int) -> bool:
        tier = self._tiers[rank]
        return len(tier) >= self.capacity or (self.max_bytes is not None and tier.bytes >= self.max_bytes)

    def has_room(self, rank: int) -> bool:
        # Hysteresis: resume a paused priority once it drains below half its capacity.
        tier = self._tiers[rank]
        if self.max_bytes is not None and tier.bytes >= self.max_bytes // 2 and len(tier):
            return False
        return len(tier) < self.capacity // 2 or self.capacity < 2

    def oldest_arrival(self) -> float | None:
        heads = [o.arrived for t in self._tiers.values() if (o := t.oldest()) is not None]
        return min(heads) if heads else None

    def effective_rank(self, item: Buffered, now: datetime) -> int:
        if self.aging_s <= 0:
            return item.rank
        waited = (now - item.created_at).total_seconds()
        # Aging lifts a request to at most the tier below high: normal cannot starve low, and a
        # high-priority request still outranks a backlog of any age (the room kept for it in the
        # engine depends on that).
        return max(item.rank - int(waited // self.aging_s), min(item.rank, AGED_CEILING))

    def _order(self, now: datetime) -> list[tuple[int, float, int]]:
        return sorted(
            (self.effective_rank(o, now), o.arrived, rank)
            for rank, t in self._tiers.items()
            if (o := t.oldest()) is not None
        )

    def best_rank(self, now: datetime) -> int | None:
        """The effective rank of the priority :meth:`take` takes from next."""
        order = self._order(now)
        return order[0][0] if order else None

    def best_tier(self, now: datetime) -> int | None:
        """The priority (its own rank, not aged) :meth:`take` takes from next."""
        order = self._order(now)
        return order[0][2] if order else None

    def take(self, n: int, now: datetime) -> list[Buffered]:
        out: list[Buffered] = []
        while len(out) < n:
            order = self._order(now)
            if not order:
                break
            urgent_s = self.urgent_s if self.deadlines else float("-inf")
            out.append(self._tiers[order[0][2]].take(now.timestamp(), urgent_s, self.weight))
        return out

    def items(self) -> list[Buffered]:
        return [i for t in self._tiers.values() for i in t.items.values()]

    def drop(self, topic_partitions: set[tuple[str, int]]) -> int:
        return len(self.pop_where(lambda i: (i.topic, i.partition) not in topic_partitions))

    def pop_where(self, keep: Callable[[Buffered], bool]) -> list[Buffered]:
        """Remove and return every item ``keep`` refuses."""
        out: list[Buffered] = []
        for t in self._tiers.values():
            out += t.rebuild(keep)
        return out
