"""The one Kafka runtime every Sluice worker is built on (after Quix Streams' committing loop).

- :class:`TrackedPublisher` produces records and says when every record of a unit of work (a
  consumed message, a request) is acknowledged by the broker; a full local queue is waited out.
- :class:`OffsetTracker` turns finished units into safe commit positions when work finishes out
  of log order.
- :class:`ConsumeLoop` is the committing consume loop: it filters end-of-partition events, hands
  each message to a :class:`Handler`, and commits a partition only up to its lowest message whose
  work is not done (at least once, stated and tested here once); rebalance hooks, pause/resume
  and a graceful stop are part of it.
- :class:`ShareLoop` is the second consumption mode: a Kafka share group (KIP-932), each record
  acknowledged on its own (accept, release, reject), any number of consumers per partition.
- :class:`TopicReader` reads whole topics without a group (a local view of a compacted topic).
- :mod:`core.kafka.stub` is an in-memory broker (like dramatiq's ``StubBroker``) so each worker's
  logic is unit-tested without a broker.
"""

from core.kafka.coords import TP, message_coords
from core.kafka.loop import ConsumeLoop, Handler
from core.kafka.offsets import OffsetTracker
from core.kafka.publisher import LazyProducer, Out, Producer, TrackedPublisher
from core.kafka.reader import TopicReader
from core.kafka.share import ShareLoop, prepare_share_group
from core.kafka.transactions import TransactionalPublisher

__all__ = [
    "TP",
    "ConsumeLoop",
    "Handler",
    "LazyProducer",
    "OffsetTracker",
    "Out",
    "Producer",
    "ShareLoop",
    "TopicReader",
    "TrackedPublisher",
    "TransactionalPublisher",
    "message_coords",
    "prepare_share_group",
]
