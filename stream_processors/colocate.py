"""Deduplicate a request on the partition it arrived on, when it arrived where its table entry is.

Sluice's producers key a request by its dedupe key with Kafka's partitioner (``core.placement``),
so request-topic partition *p* holds exactly the keys of dedupe-table partition *p*. Faust assigns
co-partitioned topics together, so the worker reading request partition *p* also owns table
partition *p*: it can settle the request at once (forward, attach or answer), writing the table
entry to changelog partition *p*, as the dedupe agent would have after the repartition hop.

The hop is skipped only when that reasoning holds for the event in hand: the key maps to the
partition it arrived on, the request topic has as many partitions as the table (else Faust does
not co-partition them), and this worker owns that table partition now. Any other request (a
foreign producer's key, a producer with another partitioner) is repartitioned as before: slower,
never wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from core.kafka import Out
from core.metrics import DEDUPE_PATH
from core.placement import partition_for
from schemas import InferenceRequest, Serde
from stream_processors.dedupe import DedupeStage

__all__ = ["Colocated"]


class Colocated:
    """Where a request's dedupe can happen; ``settle`` runs it (inside the event's context)."""

    def __init__(self, dedupe_topic: str, stage: DedupeStage, serde: Serde) -> None:
        self.dedupe_topic = dedupe_topic
        self.stage = stage
        self.serde = serde
        self.local_hits = DEDUPE_PATH.labels("local")
        self.repartitioned = DEDUPE_PATH.labels("repartitioned")

    @staticmethod
    def local_partitions(
        table_partitions: int | None, source_partitions: int | None, owned: Iterable[int]
    ) -> frozenset[int]:
        """The partitions of a source topic whose requests this worker may settle in place: none
        unless the topic is co-partitioned with the table."""
        if table_partitions is None or source_partitions != table_partitions:
            return frozenset()
        return frozenset(p for p in owned if p < table_partitions)

    def split(
        self,
        outs: list[Out],
        partition: int,
        table_partitions: int,
        local: Collection[int],
        settle: Callable[[Out], list[Out]],
    ) -> list[Out]:
        """``outs`` with a request bound for the dedupe topic replaced by what settling it in place
        gives, when its key maps to ``partition`` and ``partition`` is in ``local``."""
        result: list[Out] = []
        for out in outs:
            if out.topic != self.dedupe_topic or not isinstance(out.record, InferenceRequest):
                result.append(out)
                continue
            key = out.key_bytes()
            if key is not None and partition in local and partition_for(key, table_partitions) == partition:
                self.local_hits.inc()
                result += settle(out)
            else:
                self.repartitioned.inc()
                result.append(out)
        return result

    def on_request(self, out: Out, partition: int) -> list[Out]:
        """What the dedupe agent does with the event ``out`` would have become."""
        assert isinstance(out.record, InferenceRequest)
        headers = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in out.headers]
        return self.stage.on_request(out.record, out.value(self.serde), partition, headers)
