"""The semantic response cache: a request the exact cache missed may be answered from a
near-duplicate prompt already answered for the same tenant and route.

Events reach it on two topics keyed by the cache scope (the tenant, or ``*`` when shared), so one
worker holds a scope's whole index:

* the **lookup** topic carries requests the dedupe stage diverted here (first of their content
  key, eligible). They are looked up in batches: a cheap static embedding shortlists candidates
  of the same signature, the lexical rules veto the impossible ones, and only then does the
  sentence transformer run, on the requests that still have a candidate. A hit is answered
  (``cache_kind=semantic``, the similarity and the id it was answered from); a miss goes on to its
  model topic and is remembered (in memory) until its result.
* the **index** topic carries completions and ticks, one at a time (it owns the changelogged
  table): a successful completion of a remembered miss becomes a cache entry; a tick drops
  expired entries and those of a model whose fingerprint changed. Both topics have the same key
  and partition count, so a scope's lookups and completions reach the same worker.

A process that holds a scope's partition settles most requests in place, without the hop: the
dedupe stage asks :meth:`SemanticStage.try_local` first, and only a request whose comparison needs
the sentence transformer (a candidate survived the cheap checks and a vector is missing) goes to
the lookup topic, to be embedded in a batch. Entries are embedded once, when they are indexed.

The table survives restarts through its changelog; the in-memory matrices are rebuilt from it.
"""

from __future__ import annotations

import base64
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.catalog import Catalog
from core.headers import Headers, carried
from core.kafka import Out
from core.settings import ProcessorSettings
from schemas import CacheKind, InferenceRequest, InferenceResult, RequestState, ResultStatus
from stream_processors.embedding import Embedder, Vectors
from stream_processors.emit import Emitter
from stream_processors.router import Backlog
from stream_processors.semantic_rules import (
    answer_fingerprint,
    compatible,
    difference,
    matched_text,
    numbers,
    signature,
)

__all__ = ["Lookup", "SemanticStage"]

logger = logging.getLogger(__name__)

Entry = dict[str, Any]
_SHORTLIST = 8
_MAX_PENDING = 200_000


def _pack(v: Vectors) -> str:
    return base64.b64encode(v.astype(np.float16).tobytes()).decode()


def _unpack(s: str) -> Vectors:
    out: Vectors = np.frombuffer(base64.b64decode(s), dtype=np.float16).astype(np.float32)
    return out


class _Bucket:
    """Entries of one scope whose prompts carry the same numbers (a number that differs is a
    veto, so only these can match), with their static vectors in a matrix that grows in place."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._rows: Vectors = np.zeros((0, 0), np.float32)

    def add(self, entry: Entry) -> None:
        vec = entry["_static"]
        n = len(self.entries)
        if n == len(self._rows):
            grown = np.zeros((max(16, 2 * n), len(vec)), np.float32)
            if n:
                grown[:n] = self._rows[:n]
            self._rows = grown
        self._rows[n] = vec
        self.entries.append(entry)

    def remove(self, keys: set[str]) -> None:
        kept = [e for e in self.entries if _entry_key(e) not in keys]
        if len(kept) != len(self.entries):
            self.entries = []
            self._rows = np.zeros((0, 0), np.float32)
            for e in kept:
                self.add(e)

    @property
    def matrix(self) -> Vectors:
        return self._rows[: len(self.entries)]


@dataclass
class Lookup:
    """One diverted request on its way through a lookup batch."""

    request: InferenceRequest
    raw: bytes
    headers: Headers
    text: str = ""
    signature: str | None = None
    static: Vectors | None = None
    candidates: list[Entry] = field(default_factory=list)


class SemanticStage:
    def __init__(
        self,
        table: MutableMapping[str, Entry],
        emitter: Emitter,
        catalog: Catalog,
        settings: ProcessorSettings,
        embedder: Embedder,
        backlog: Backlog | None = None,
        clock: Callable[[], float] = time.time,
        *,
        partitions: int = 1,
        owns: Callable[[int], bool] | None = None,
    ) -> None:
        self.table = table
        # Both semantic topics are partitioned by scope explicitly (crc32), so a process can tell
        # whether it holds a scope's index: ``owns(partition)``.
        self.partitions = partitions
        self.owns = owns
        self.emit = emitter
        self.catalog = catalog
        self.settings = settings
        self.cfg = settings.semantic
        self.embedder = embedder
        self.backlog = backlog or Backlog()
        self.clock = clock
        # (scope, numbers in the prompt) -> bucket; scope -> its entries, oldest first (bounds).
        self._buckets: dict[tuple[str, frozenset[str]], _Bucket] = {}
        self._by_scope: dict[str, OrderedDict[str, Entry]] = {}
        self._fingerprints = {m.name: answer_fingerprint(m) for m in catalog}
        self._last_signature: tuple[InferenceRequest | None, str | None] = (None, None)
        self._indexed = -1  # table size the in-memory index was built from
        self._vectors: OrderedDict[str, Vectors] = OrderedDict()  # full embeddings, by text
        # Misses waiting for their result, by request id. In memory only: one lost in a restart
        # or rebalance just is not indexed (a cache miss later, never a wrong answer).
        self._pending: OrderedDict[str, Entry] = OrderedDict()

    # -- who takes part --------------------------------------------------------------------
    def scope(self, tenant: str) -> str:
        return "*" if self.settings.cache_shared_across_tenants else tenant

    def entry_count(self) -> int:
        """Cache entries this process holds (its partitions of the table)."""
        return sum(len(scope) for scope in self._by_scope.values())

    def partition_of(self, tenant: str) -> int:
        return zlib.crc32(self.scope(tenant).encode()) % self.partitions

    def eligible(self, request: InferenceRequest) -> bool:
        """Whether a request the exact cache missed is looked up here (else it runs)."""
        return (
            self.cfg.enabled
            and request.cache
            and request.route is not None
            and request.tenant not in self.cfg.disabled_tenants
            and self._signature(request) is not None
        )

    def _signature(self, request: InferenceRequest) -> str | None:
        assert request.route is not None
        # eligible() and the lookup ask for the same request in a row: computed once.
        if self._last_signature[0] is request:
            return self._last_signature[1]
        fingerprint = self._fingerprints.get(request.route.model)
        sig = None if fingerprint is None else signature(request, fingerprint, include_sampled=self.cfg.include_sampled)
        self._last_signature = (request, sig)
        return sig

    # -- the in-memory index ---------------------------------------------------------------
    def _index(self) -> dict[tuple[str, frozenset[str]], _Bucket]:
        # The table is the truth (restored from its changelog after a restart or a rebalance);
        # the buckets are rebuilt whenever it holds entries this process did not add itself.
        if len(self.table) != self._indexed:
            self._buckets, self._by_scope = {}, {}
            entries = [e for k, e in list(self.table.items()) if k.startswith("entry:")]
            for entry in sorted(entries, key=lambda e: e["at"]):
                self._add(entry)
            self._indexed = len(self.table)
        return self._buckets

    def _add(self, entry: Entry) -> None:
        entry = {**entry, "_static": _unpack(entry["static"])}
        self._buckets.setdefault((entry["scope"], numbers(entry["text"])), _Bucket()).add(entry)
        self._by_scope.setdefault(entry["scope"], OrderedDict())[_entry_key(entry)] = entry

    def _drop(self, keys: set[str]) -> None:
        for key in keys:
            self.table.pop(key, None)
        touched = set()
        for scope in self._by_scope.values():
            for key in keys & scope.keys():
                entry = scope.pop(key)
                touched.add((entry["scope"], numbers(entry["text"])))
        for where in touched:
            self._buckets[where].remove(keys)
        self._indexed = len(self.table)

    # -- lookups (batched; the app runs `vectors` in a worker thread) ----------------------
    def try_local(self, request: InferenceRequest, raw: bytes, headers: Headers | None) -> list[Out] | None:
        """Settle a request here, without a hop, when this process holds its scope's index and
        no sentence embedding has to be computed (no candidate survives the cheap checks, or the
        candidates' vectors are known); ``None``: send it to the lookup topic."""
        if not self.embedder.ready or self.owns is None or not self.owns(self.partition_of(request.tenant)):
            return None
        items, texts = self.prepare([(request, raw, list(headers or []))])
        if texts:
            return None
        return self.finish(items, [], None)

    def indexable_text(self, result: InferenceResult) -> str | None:
        """The text a result's entry will be indexed under, if it becomes an entry."""
        pending = self._pending.get(result.request_id)
        if pending is None or result.status is not ResultStatus.SUCCEEDED or result.cached:
            return None
        text: str = pending["text"]
        return text

    def entry_vectors(self, text: str) -> tuple[Vectors, Vectors]:
        """(static, full) vectors of an entry's text: the expensive part of indexing, safe to
        run in a thread."""
        return self.embedder.static([text])[0], self.embedder.embed([text])[0]

    def remember_vectors(self, texts: Sequence[str], vectors: Vectors | None) -> None:
        for text, vec in zip(texts, vectors if vectors is not None else [], strict=True):
            self._vectors[text] = vec
        while len(self._vectors) > 4 * self.cfg.max_entries_per_tenant:
            self._vectors.popitem(last=False)

    def prepare(self, batch: Sequence[tuple[InferenceRequest, bytes, Headers]]) -> tuple[list[Lookup], list[str]]:
        """Shortlist candidates for each request; return the lookups and the texts that need a
        full embedding (requests with a surviving candidate, and those candidates)."""
        items = [Lookup(req, raw, carried(headers)) for req, raw, headers in batch]
        for it in items:
            it.text = matched_text(it.request)
            it.signature = self._signature(it.request)
        index = self._index()
        buckets: dict[int, _Bucket] = {}
        for it in items:
            bucket = index.get((self.scope(it.request.tenant), numbers(it.text))) if it.signature else None
            if bucket is not None and bucket.entries:
                buckets[id(it)] = bucket
        live = [it for it in items if id(it) in buckets]
        if not live:
            return items, []
        statics = self.embedder.static([it.text for it in live])
        now = self.clock()
        need: dict[str, None] = {}
        for it, vec in zip(live, statics, strict=True):
            it.static = vec
            near = buckets[id(it)]
            scores = near.matrix @ vec
            # The closest few by the static vector are examined; a near-duplicate is among them.
            top = np.argpartition(-scores, _SHORTLIST)[:_SHORTLIST] if len(scores) > _SHORTLIST else None
            order = top[np.argsort(-scores[top])] if top is not None else np.argsort(-scores)
            for i in order:
                if scores[i] < self.cfg.prefilter:
                    break
                entry = near.entries[int(i)]
                if not self._usable(entry, it, now):
                    continue
                diff = difference(it.text, entry["text"])
                if diff.veto is None:
                    it.candidates.append(entry)
                    # The contrast check compares an added word with the words already there.
                    need.update(
                        dict.fromkeys([it.text, entry["text"], *diff.added, *(diff.others if diff.added else ())])
                    )
        return items, [t for t in need if t not in self._vectors]

    def _usable(self, entry: Entry, it: Lookup, now: float) -> bool:
        r = it.request
        return bool(
            entry["signature"] == it.signature
            and now - entry["at"] <= self.cfg.max_age_s
            and compatible(
                cached_max_tokens=entry["max_tokens"],
                finish_reason=entry["result"]["finish_reason"],
                completion_tokens=entry["result"]["completion_tokens"],
                max_tokens=r.max_tokens,
            )
        )

    def vectors(self, texts: Sequence[str]) -> Vectors:
        """The full embeddings of ``texts`` (the expensive step; safe to run in a thread)."""
        return self.embedder.embed(texts)

    def finish(self, items: list[Lookup], texts: Sequence[str], vectors: Vectors | None) -> list[Out]:
        self.remember_vectors(texts, vectors)
        out: list[Out] = []
        for it in items:
            hit = self._best(it)
            out += self._answer(it, *hit) if hit else self._miss(it)
        return out

    def _best(self, it: Lookup) -> tuple[Entry, float] | None:
        best: tuple[Entry, float] | None = None
        if not it.candidates or it.text not in self._vectors:
            return None
        v = self._vectors[it.text]
        for entry in it.candidates:
            sim = float(v @ self._vectors[entry["text"]])
            if sim < self.cfg.threshold or (best and sim <= best[1]):
                continue
            if self._contrasts(it.text, entry["text"]):
                continue
            best = (entry, sim)
        return best

    def _contrasts(self, a: str, b: str) -> bool:
        # One added word that closely resembles a word already there is an alternative of the
        # same kind ("pound" beside "kilogram", "odd" beside "even"), not an elaboration.
        diff = difference(a, b)
        if not diff.added or not diff.others:
            return False
        added = np.stack([self._vectors[w] for w in sorted(diff.added)])
        others = np.stack([self._vectors[w] for w in sorted(diff.others)])
        return bool((added @ others.T).max() >= self.cfg.contrast)

    def _answer(self, it: Lookup, entry: Entry, similarity: float) -> list[Out]:
        result = InferenceResult.answered_from(
            it.request,
            entry["result"],
            original=entry["request_id"],
            cache_kind=CacheKind.SEMANTIC,
            similarity=similarity,
        )
        r = it.request
        logger.debug("semantic hit: %s answered from %s (%.3f)", r.request_id, entry["request_id"], similarity)
        return self.emit.result(result, cached=True, headers=it.headers)

    def _miss(self, it: Lookup) -> list[Out]:
        r = it.request
        assert r.route is not None
        model = r.route.model
        self.backlog.routed(model, r.request_id, priority=r.priority)
        out = [
            Out(self.emit.topics.model(model, r.priority), r.request_id, r, list(it.headers), encoded=it.raw),
            *self.emit.status(r.request_id, RequestState.ROUTED, model=model, detail=r.route.reason),
        ]
        if it.signature is not None:
            # Remembered until its result; its vectors are computed when it is indexed.
            self._pending[r.request_id] = {
                "request_id": r.request_id,
                "scope": self.scope(r.tenant),
                "signature": it.signature,
                "model": model,
                "max_tokens": r.max_tokens,
                "text": it.text,
                "fingerprint": self._fingerprints.get(model, ""),
                "at": self.clock(),
            }
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)
        return out

    # -- the index topic (one event at a time: table writes follow the event's partition) ---
    def _synced(self) -> bool:
        return self._indexed == len(self.table)

    def on_completed(self, result: InferenceResult, partition: int, static: Vectors | None = None) -> None:
        """A result of a request looked up here: a success becomes a cache entry (``static``:
        its static vector, when the caller computed it off the event loop)."""
        pending = self._pending.pop(result.request_id, None)
        if pending is None or result.status is not ResultStatus.SUCCEEDED or result.cached:
            return
        if static is None:
            static = self.embedder.static([pending["text"]])[0]
        synced = self._synced()
        entry = {
            **pending,
            "static": _pack(static),
            "p": partition,
            "at": self.clock(),
            "result": result.stored(),
        }
        key = _entry_key(entry)
        replaced = key in self.table
        self.table[key] = entry
        if synced and not replaced:
            self._add(entry)
            self._indexed = len(self.table)
        self._index()
        scope = self._by_scope.get(entry["scope"], OrderedDict())
        if len(scope) > self.cfg.max_entries_per_tenant:
            excess = len(scope) - self.cfg.max_entries_per_tenant
            self._drop(set(list(scope)[:excess]))

    def sweep(self, partition: int) -> int:
        """Drop this partition's entries that are too old, or whose model's answers changed."""
        now = self.clock()
        self._index()
        prints = {m.name: answer_fingerprint(m) for m in self.catalog}
        while self._pending and now - next(iter(self._pending.values()))["at"] > self.settings.inflight_ttl_s:
            self._pending.popitem(last=False)
        doomed: set[str] = set()
        for key, entry in list(self.table.items()):
            if entry.get("p") != partition:
                continue
            if now - entry["at"] > self.cfg.max_age_s or not self._current(entry, prints):
                doomed.add(key)
        if doomed:
            self._drop(doomed)
            logger.debug("semantic sweep of partition %d removed %d entries", partition, len(doomed))
        return len(doomed)

    @staticmethod
    def _current(entry: Entry, prints: dict[str, str]) -> bool:
        # The signature embeds the fingerprint; an entry of a model no longer in the catalog, or
        # whose fingerprint changed, can never match again.
        return entry["model"] in prints and entry.get("fingerprint", prints[entry["model"]]) == prints[entry["model"]]


def _entry_key(entry: Entry) -> str:
    return f"entry:{entry['scope']}:{entry['request_id']}"
