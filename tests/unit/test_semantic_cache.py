"""The semantic cache's matching rules and its stage over a plain dict (the Faust table in
production), with a test double for the embedding model: sentence vectors are set per text so a
similarity is exactly what a test says; word vectors are pseudo-random (nearly orthogonal)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from core.catalog import Catalog
from core.kafka import Out
from core.placement import dedupe_key
from core.settings import ProcessorSettings
from core.topics import Topics
from schemas import (
    CacheKind,
    ChatMessage,
    CostMetric,
    InferenceRequest,
    InferenceResult,
    RequestStatus,
    Route,
    Serde,
    utcnow,
)
from stream_processors.dedupe import DedupeStage
from stream_processors.embedding import Vectors
from stream_processors.emit import Emitter
from stream_processors.semantic import SemanticStage
from stream_processors.semantic_rules import compatible, difference, lexical_veto
from tests.support import model_entry

DIM = 256
CATALOG = Catalog(
    models=[
        model_entry("cheap", tier=1, context_length=1000, input_price_per_1m=1, output_price_per_1m=2),
        model_entry("big", tier=3, context_length=9000, input_price_per_1m=10, output_price_per_1m=20),
    ]
)
SERDE = Serde()
TOPICS = Topics("u.")
ORIGINAL = "What is the capital of France?"
PARAPHRASE = "Tell me France's capital city."


class PlantedEmbedder:
    """Test double for all-MiniLM-L6-v2: ``angles[text]`` places a sentence on a unit circle, so
    two planted sentences have similarity cos(difference of angles); other texts (single words)
    get a pseudo-random unit vector."""

    def __init__(self, angles: dict[str, float]) -> None:
        self.angles = angles
        self.embedded: list[str] = []

    ready = True

    def load(self) -> None:
        pass

    def _vec(self, text: str) -> Vectors:
        if text in self.angles:
            v = np.zeros(DIM, np.float32)
            v[0], v[1] = math.cos(self.angles[text]), math.sin(self.angles[text])
            return v
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
        r = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        out: Vectors = r / np.linalg.norm(r)
        return out

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.embedded += texts
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)

    def static(self, texts: Sequence[str]) -> Vectors:
        return np.stack([self._vec(t) for t in texts])


def angle_for(similarity: float) -> float:
    return math.acos(similarity)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**semantic: Any) -> ProcessorSettings:
    shared = semantic.pop("shared", False)
    return ProcessorSettings.model_validate(
        {"cache_shared_across_tenants": shared, "semantic": {"enabled": True, **semantic}}
    )


def make(
    angles: dict[str, float] | None = None,
    table: dict[str, Any] | None = None,
    catalog: Catalog = CATALOG,
    **semantic: Any,
) -> tuple[SemanticStage, dict[str, Any], Clock]:
    table = {} if table is None else table
    clock = Clock()
    embedder = PlantedEmbedder(angles or {ORIGINAL: 0.0, PARAPHRASE: angle_for(0.95)})
    stage = SemanticStage(table, Emitter(TOPICS, SERDE, catalog), catalog, settings(**semantic), embedder, clock=clock)
    return stage, table, clock


def req(content: str, rid: str, tenant: str = "acme", **kw: Any) -> InferenceRequest:
    r = InferenceRequest.model_validate(
        {"request_id": rid, "tenant": tenant, "messages": [ChatMessage(role="user", content=content)], **kw}
    )
    r.route = Route(model=kw.pop("route_model", "cheap"), reason="test")
    r.dedupe_key = dedupe_key(r, ProcessorSettings())
    return r


def lookup(stage: SemanticStage, *requests: InferenceRequest) -> list[Out]:
    items, texts = stage.prepare(
        [(r, SERDE.encode(r), [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")]) for r in requests]
    )
    return stage.finish(items, texts, stage.vectors(texts) if texts else None)


def answered(
    stage: SemanticStage,
    r: InferenceRequest,
    *,
    finish_reason: str = "stop",
    completion_tokens: int = 5,
    model: str = "cheap",
) -> None:
    """Look ``r`` up (a miss), then feed its engine result to the index."""
    out = lookup(stage, r)
    assert result_in(out) is None, "a miss"
    now = utcnow()
    result = InferenceResult.model_validate(
        {
            "request_id": r.request_id,
            "tenant": r.tenant,
            "priority": r.priority,
            "model": model,
            "status": "succeeded",
            "output_text": "Paris.",
            "finish_reason": finish_reason,
            "prompt_tokens": 12,
            "completion_tokens": completion_tokens,
            "created_at": r.created_at,
            "started_at": now,
            "completed_at": now,
            "engine_run_id": "run-1",
            "dedupe_key": r.dedupe_key,
        }
    )
    stage.on_completed(result, 0)


def topics_of(out: list[Out]) -> list[str]:
    return [f.topic for f in out]


def result_in(out: list[Out]) -> InferenceResult | None:
    return next((SERDE.decode(InferenceResult, f.value(SERDE)) for f in out if f.topic == TOPICS.results), None)


# -- lexical rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "veto"),
    [
        (ORIGINAL, PARAPHRASE, None),
        (
            "Translate to French: Where is the train station?",
            "Translate to German: Where is the train station?",
            "content words substituted",
        ),
        (
            "Is this review positive? The food was amazing and the staff were friendly.",
            "Is this review positive? The food was awful and the staff were rude.",
            "content words substituted",
        ),
        ("Summarize ticket 41: login fails.", "Summarize ticket 42: login fails.", "numbers differ"),
        ("Convert 10 kilometers to miles.", "Convert 10 miles to kilometers.", "word order differs"),
        ("Is it safe to store passwords?", "Is it not safe to store passwords?", "negation differs"),
        ("Translate to French: hello", "Translate into French: hello", None),
        ("What is a leap year?", "What is a leap year on Mars and Venus?", "relation words differ"),
        ("What is a leap year?", "What is a leap year for Mars and Venus?", "more than one content word added"),
        (
            "Summarize this ticket: the customer cannot log in after the update.",
            "Summarize this ticket: the customer cannot log out after the update.",
            "relation words differ",
        ),
        ("How do I turn on dark mode?", "How do I turn off dark mode?", "relation words differ"),
        ("Wash hands before eating.", "Wash hands after eating.", "relation words differ"),
        ("Flights from Paris to Rome", "Flights to Paris from Rome", "word order differs"),
        ("Transfer money to savings", "Transfer money from savings", "relation words differ"),
        ("Coffee with sugar", "Coffee without sugar", "negation differs"),
    ],
)
def test_lexical_rules_veto_what_an_embedding_blurs(a: str, b: str, veto: str | None) -> None:
    assert lexical_veto(a, b) == veto
    assert lexical_veto(b, a) == veto


def test_an_added_word_is_reported_with_the_words_it_may_contrast_with() -> None:
    diff = difference(ORIGINAL, PARAPHRASE)
    assert diff.added == {"city"} and diff.others == {"capital", "france"}


@pytest.mark.parametrize(
    ("cached_max", "finish", "tokens", "asked", "ok"),
    [
        (64, "stop", 10, 64, True),
        (64, "stop", 10, 12, True),
        (64, "stop", 10, 8, False),  # the cached answer is longer than this request allows
        (16, "length", 16, 16, True),
        (16, "length", 16, 32, False),  # cut at 16: a longer limit could have produced more
    ],
)
def test_max_tokens_compatibility(cached_max: int, finish: str, tokens: int, asked: int, ok: bool) -> None:
    assert (
        compatible(cached_max_tokens=cached_max, finish_reason=finish, completion_tokens=tokens, max_tokens=asked) is ok
    )


# -- the stage --------------------------------------------------------------------------------
def test_a_paraphrase_is_answered_from_the_cache_without_a_model_topic() -> None:
    stage, _, _ = make()
    answered(stage, req(ORIGINAL, "r1"))
    out = lookup(stage, req(PARAPHRASE, "r2"))
    assert not [t for t in topics_of(out) if t.startswith("u.model.")]
    result = result_in(out)
    assert result is not None
    assert (result.request_id, result.output_text, result.cached) == ("r2", "Paris.", True)
    assert result.cache_kind is CacheKind.SEMANTIC and result.deduplicated_from == "r1"
    assert result.similarity == pytest.approx(0.95, abs=1e-3)
    assert result.dedupe_key == req(PARAPHRASE, "r2").dedupe_key  # completes its exact key too
    metric = next(SERDE.decode(CostMetric, f.value(SERDE)) for f in out if f.topic == TOPICS.cost_metrics)
    assert (metric.cached, metric.cache_kind, metric.cost_usd) == (True, CacheKind.SEMANTIC, 0.0)
    assert metric.baseline_cost_usd > 0
    status = next(SERDE.decode(RequestStatus, f.value(SERDE)) for f in out if f.topic == TOPICS.status)
    assert status.state == "cached" and status.detail == "semantic match of r1 (similarity 0.950)"
    headers = next(f.headers for f in out if f.topic == TOPICS.results)
    assert dict(headers)["traceparent"].startswith(b"00-aaaa")


def test_a_miss_goes_to_its_model_topic_with_a_pending_entry() -> None:
    stage, _, _ = make()
    out = lookup(stage, req(ORIGINAL, "r1", priority="high"))
    assert topics_of(out) == ["u.model.cheap.high", TOPICS.status]
    assert SERDE.decode(RequestStatus, out[1].value(SERDE)).state == "routed"
    assert result_in(out) is None
    assert stage.embedder.embedded == []  # type: ignore[attr-defined]  # nothing to compare with


def test_the_threshold_edge() -> None:
    for similarity, hit in ((0.8, True), (0.79, False)):
        stage, _, _ = make({ORIGINAL: 0.0, PARAPHRASE: angle_for(similarity) * (1 - 1e-7)}, threshold=0.8)
        answered(stage, req(ORIGINAL, "r1"))
        assert (result_in(lookup(stage, req(PARAPHRASE, "r2"))) is not None) is hit, similarity


def test_tenants_are_isolated_unless_the_cache_is_shared() -> None:
    stage, _, _ = make()
    answered(stage, req(ORIGINAL, "r1", tenant="acme"))
    assert result_in(lookup(stage, req(PARAPHRASE, "r2", tenant="globex"))) is None
    shared, _, _ = make(shared=True)
    answered(shared, req(ORIGINAL, "r1", tenant="acme"))
    hit = result_in(lookup(shared, req(PARAPHRASE, "r2", tenant="globex")))
    assert hit is not None and hit.tenant == "globex"


def test_sampled_requests_are_not_cache_entries_by_default() -> None:
    stage, _, _ = make()
    assert not stage.eligible(req(ORIGINAL, "r1", temperature=0.7))
    assert stage.eligible(req(ORIGINAL, "r1"))
    sampled, _, _ = make(include_sampled=True)
    answered(sampled, req(ORIGINAL, "r1", temperature=0.7, seed=1))
    assert result_in(lookup(sampled, req(PARAPHRASE, "r2", temperature=0.7, seed=2))) is None
    assert result_in(lookup(sampled, req(PARAPHRASE, "r3", temperature=0.7, seed=1))) is not None


@pytest.mark.parametrize(
    ("change", "hit"),
    [
        ({}, True),
        ({"max_tokens": 2}, False),  # the cached answer has 5 tokens
        ({"stop": ["."]}, False),
        ({"response_format": '{"type": "json_object"}'}, False),
        ({"model": "big"}, False),  # another model hint
    ],
)
def test_parameters_that_shape_the_answer_must_match(change: dict[str, Any], hit: bool) -> None:
    stage, _, _ = make()
    answered(stage, req(ORIGINAL, "r1"))
    assert (result_in(lookup(stage, req(PARAPHRASE, "r2", **change))) is not None) is hit


def test_an_answer_cut_at_max_tokens_serves_only_the_same_limit() -> None:
    stage, _, _ = make()
    answered(stage, req(ORIGINAL, "r1", max_tokens=5), finish_reason="length", completion_tokens=5)
    assert result_in(lookup(stage, req(PARAPHRASE, "r2", max_tokens=50))) is None
    assert result_in(lookup(stage, req(PARAPHRASE, "r3", max_tokens=5))) is not None


def test_other_prior_messages_do_not_match() -> None:
    stage, _, _ = make()
    system = ChatMessage(role="system", content="Answer in French.")
    r1 = req(ORIGINAL, "r1")
    r1.messages = [system, *r1.messages]
    answered(stage, r1)
    assert result_in(lookup(stage, req(PARAPHRASE, "r2"))) is None
    r3 = req(PARAPHRASE, "r3")
    r3.messages = [system, *r3.messages]
    assert result_in(lookup(stage, r3)) is not None


def test_opt_outs() -> None:
    stage, _, _ = make(disabled_tenants=["quiet"])
    assert not stage.eligible(req(ORIGINAL, "r1", tenant="quiet"))
    assert not stage.eligible(req(ORIGINAL, "r1", cache=False))
    off, _, _ = make(enabled=False)
    assert not off.eligible(req(ORIGINAL, "r1"))


def test_a_lexical_veto_or_a_contrasting_word_is_a_miss_even_when_similar() -> None:
    near = "Which is heavier, a kilogram of feathers or a pound of steel?"
    # One word added ("pound"); a second "kilogram" replaced by it would be a substitution.
    base = "Which is heavier, a kilogram of feathers or steel?"
    angles = {base: 0.0, near: angle_for(0.99), "What is the capital of Germany?": angle_for(0.99)}
    stage, _, _ = make(angles | {ORIGINAL: 0.0})
    answered(stage, req(ORIGINAL, "r1"))
    assert result_in(lookup(stage, req("What is the capital of Germany?", "r2"))) is None
    # "pound" is added next to "kilogram": a contrast when their word vectors are close.
    contrast, _, _ = make(angles | {"pound": 0.0, "kilogram": angle_for(0.9)})
    answered(contrast, req(base, "r1"))
    assert result_in(lookup(contrast, req(near, "r2"))) is None
    elaboration, _, _ = make(angles | {"pound": 0.0, "kilogram": angle_for(0.3)})
    answered(elaboration, req(base, "r1"))
    assert result_in(lookup(elaboration, req(near, "r2"))) is not None


def test_the_index_survives_a_restart_through_its_table() -> None:
    stage, table, _ = make()
    answered(stage, req(ORIGINAL, "r1"))
    restarted, _, _ = make(table=table)
    assert result_in(lookup(restarted, req(PARAPHRASE, "r2"))) is not None


def test_bounds_per_tenant_and_age() -> None:
    angles = {f"Question number {w}?": 0.0 for w in ("one", "two", "three")}
    stage, table, clock = make(angles, max_entries_per_tenant=2, max_age_s=100)
    for i, w in enumerate(("one", "two", "three")):
        clock.now += 1
        answered(stage, req(f"Question number {w}?", f"r{i}"))
    entries = sorted(k for k in table if k.startswith("entry:"))
    assert entries == ["entry:acme:r1", "entry:acme:r2"]  # the oldest went
    clock.now += 101
    assert stage.sweep(0) == 2 and not table


def test_a_changed_catalog_model_invalidates_its_entries() -> None:
    stage, table, _ = make()
    answered(stage, req(ORIGINAL, "r1"))
    changed = Catalog(
        models=[
            model_entry("cheap", tier=1, context_length=1000, source="other/weights"),
            model_entry("big", tier=3, context_length=9000),
        ]
    )
    after, _, _ = make(table=table, catalog=changed)
    assert result_in(lookup(after, req(PARAPHRASE, "r2"))) is None
    assert after.sweep(0) == 1 and not [k for k in table if k.startswith("entry:")]


def test_failed_or_cached_completions_are_not_entries() -> None:
    stage, table, _ = make()
    lookup(stage, req(ORIGINAL, "r1"))
    now = utcnow()
    failed = InferenceResult.model_validate(
        {
            "request_id": "r1",
            "tenant": "acme",
            "priority": "normal",
            "model": "cheap",
            "status": "failed",
            "created_at": now,
            "started_at": now,
            "completed_at": now,
        }
    )
    stage.on_completed(failed, 0)
    assert table == {}


def test_the_dedupe_stage_diverts_first_requests_here() -> None:
    sem, _, _ = make()
    dedupe = DedupeStage({}, Emitter(TOPICS, SERDE, CATALOG), settings(), semantic=sem)
    r = req(ORIGINAL, "r1")
    out = dedupe.on_request(r, SERDE.encode(r), 0)
    assert [(f.topic, f.key, dict(f.headers)["kind"]) for f in out] == [(TOPICS.semantic, b"acme", b"request")]
    r2 = req(ORIGINAL, "r2", cache=False)
    r2.dedupe_key = "idem:acme:k"
    assert topics_of(dedupe.on_request(r2, SERDE.encode(r2), 0))[0] == "u.model.cheap.normal"


def test_a_process_holding_the_scope_settles_requests_without_a_candidate_itself() -> None:
    sem, _, _ = make()
    sem.owns = lambda partition: True
    dedupe = DedupeStage({}, Emitter(TOPICS, SERDE, CATALOG), settings(), semantic=sem)
    first = req(ORIGINAL, "r1")
    # Nothing indexed yet: straight to the model topic, remembered for indexing.
    assert topics_of(dedupe.on_request(first, SERDE.encode(first), 0)) == ["u.model.cheap.normal", TOPICS.status]
    answered(sem, req(ORIGINAL, "r0"))
    # A candidate whose comparison needs the sentence transformer: batched in the lookup agent.
    para = req(PARAPHRASE, "r2")
    out = dedupe.on_request(para, SERDE.encode(para), 0)
    assert [(f.topic, f.partition) for f in out] == [(TOPICS.semantic, sem.partition_of("acme"))]
    # Once both vectors are known, the same comparison is settled in place: a hit.
    lookup(sem, para)
    again = req(PARAPHRASE, "r3", max_tokens=100)  # another content key: not r2's duplicate
    hit = result_in(dedupe.on_request(again, SERDE.encode(again), 0))
    assert hit is not None and hit.cache_kind is CacheKind.SEMANTIC and hit.deduplicated_from == "r0"
    # Another process holds the scope: always the lookup topic.
    sem.owns = lambda partition: False
    other = req("Something else entirely?", "r4")
    assert topics_of(dedupe.on_request(other, SERDE.encode(other), 0)) == [TOPICS.semantic]


def test_scope_partitions_are_stable_and_in_range() -> None:
    sem, _, _ = make()
    sem.partitions = 6
    parts = {t: sem.partition_of(t) for t in ("acme", "globex", "initech")}
    assert all(0 <= p < 6 for p in parts.values()) and parts == {t: sem.partition_of(t) for t in parts}


def test_prompts_with_other_numbers_never_reach_the_embedding_model() -> None:
    base, para = (
        "Summarize ticket 41: login fails after the update.",
        "Give a summary of ticket 41: login fails after the update.",
    )
    stage, _, _ = make({base: 0.0, para: angle_for(0.95)})
    answered(stage, req(base, "r1"))
    embedder = stage.embedder
    embedder.embedded.clear()  # type: ignore[attr-defined]
    assert result_in(lookup(stage, req("Summarize ticket 42: login fails after the update.", "r2"))) is None
    assert embedder.embedded == []  # type: ignore[attr-defined]
    assert result_in(lookup(stage, req(para, "r3"))) is not None
