"""Where a request lands: its dedupe key, and the partition a key maps to.

Sluice's producers key each request by its dedupe key (its request id when it has none), and every
Sluice producer partitions keys as Kafka's Java client does (murmur2, ``partitioner=murmur2_random``
in librdkafka). A request then arrives on the request-topic partition whose number is that of its
dedupe-table partition, and the router settles it there, without the repartition hop through the
dedupe topic. A request from another producer (another key, another partitioner) still lands
anywhere and takes the hop; the result is the same, only slower.
"""

from __future__ import annotations

import hashlib
import json
import struct

from core.settings import ProcessorSettings
from schemas import InferenceRequest

__all__ = ["dedupe_key", "murmur2", "partition_for", "placement_key"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned 32-bit int."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    whole = length // 4
    for (k,) in struct.iter_unpack("<I", data[: whole * 4]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[whole * 4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a non-null key (``toPositive(murmur2) % n``)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def dedupe_key(request: InferenceRequest, settings: ProcessorSettings) -> str | None:
    """``idem:<tenant>:<key>`` for an idempotency key; else ``content:<scope>:<sha256>`` of what
    determines the answer (model hint, messages, sampling parameters), unless the request opts out
    of the cache; ``None`` when the request is not deduplicated at all."""
    if not settings.dedupe_enabled:
        return None
    if request.idempotency_key:
        return f"idem:{request.tenant}:{request.idempotency_key}"
    if not (request.cache and settings.cache_enabled):
        return None
    content = {
        "model": request.model,
        "messages": [[m.role, m.content] for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": request.stop,
        "response_format": request.response_format,
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    scope = "*" if settings.cache_shared_across_tenants else request.tenant
    return f"content:{scope}:{digest}"


def placement_key(request: InferenceRequest, settings: ProcessorSettings) -> str:
    """The Kafka key Sluice's producers give a request: its dedupe key, so it lands co-partitioned
    with its dedupe-table entry; its request id when it is not deduplicated."""
    return dedupe_key(request, settings) or request.request_id
