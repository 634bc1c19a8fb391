"""The semantic cache on the real embedding model (all-MiniLM-L6-v2), the real broker and
ClickHouse. Answers come from the instant engine (the named test double): what is under test is
which requests the router answers from the cache and which reach a model topic."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from analytics.query import savings_sql
from analytics.store import Store
from producers import SluiceClient
from sluice.local.stack import LocalStack
from tests.integration.helpers import results, topic_keys
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.semantic]

FRANCE = "What is the capital of France?"
FRANCE_PARAPHRASE = "Tell me France's capital city."
REVIEW = "Is this review positive? The food was amazing and the staff were friendly."
REVIEW_REVERSED = "Is this review positive? The food was awful and the staff were rude."
FRENCH = "Translate to French: Where is the train station?"
GERMAN = "Translate to German: Where is the train station?"
# One near miss of each family that must never be answered from its original: (original, near miss).
NEAR_MISSES = [
    (  # function-word swap: the reported defect
        "Summarize this ticket: the customer cannot log in after the update.",
        "Summarize this ticket: the customer cannot log out after the update.",
    ),
    ("Is it safe to store passwords in a spreadsheet?", "Is it not safe to store passwords in a spreadsheet?"),
    ("How do I turn on two-factor authentication?", "How do I turn off two-factor authentication?"),
    ("Should I water the plants before sunrise?", "Should I water the plants after sunrise?"),
    ("What is the population of Canada?", "What is the population of Mexico?"),  # entity
    ("Summarize invoice 1182 in one line.", "Summarize invoice 1183 in one line."),  # number
    ("Convert 12 kilograms to grams.", "Convert 12 pounds to grams."),  # unit
    ("Convert 5 kilometers to miles.", "Convert 5 miles to kilometers."),  # direction
    (REVIEW, REVIEW_REVERSED),  # antonym
    (FRENCH, GERMAN),  # language
]


_SEMANTIC_ON: dict[str, Any] = {"processor": {"semantic": {"enabled": True}}}


def _indexed(stack: LocalStack, ids: list[str]) -> None:
    """Wait until the router's changelogged index holds an entry for each of ``ids``."""
    changelog = stack.topics.table_changelog(stack.settings.processor.app_id, "semantic")
    wait_until(
        lambda: topic_keys(stack.settings, [changelog], quiet_s=1.0),
        lambda keys: all(any(k.endswith(f':{i}"') and "entry:" in k for k in keys) for i in ids),
        timeout=120,
        what="semantic index entries for the answered requests",
    )


def test_paraphrases_hit_near_misses_and_other_tenants_run(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store, embedding_model_dir: Path
) -> None:
    stack = make_stack(**_SEMANTIC_ON)
    client = SluiceClient(stack.settings)
    # Its own tenant: the cost ledger below is read from the session's ClickHouse, shared by tests.
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    originals = [client.submit(text, tenant=tenant, max_tokens=8) for text in (FRANCE, REVIEW, FRENCH)]
    client.flush()
    wait_until(
        lambda: results(clickhouse_store, originals),
        lambda r: len(r) == 3,
        timeout=180,
        what="the originals' results",
    )
    _indexed(stack, originals)

    hit = client.submit(FRANCE_PARAPHRASE, tenant=tenant, max_tokens=8)
    reversed_review = client.submit(REVIEW_REVERSED, tenant=tenant, max_tokens=8)
    german = client.submit(GERMAN, tenant=tenant, max_tokens=8)
    other_tenant = client.submit(FRANCE_PARAPHRASE, tenant="globex", max_tokens=8)
    client.flush()
    later = [hit, reversed_review, german, other_tenant]
    rows = wait_until(
        lambda: results(clickhouse_store, later),
        lambda r: len(r) == 4,
        timeout=120,
        what="results of the second round",
    )
    assert rows[hit]["cache_kind"] == "semantic" and rows[hit]["cached"]
    assert rows[hit]["deduplicated_from"] == originals[0]
    assert 0.8 <= rows[hit]["similarity"] < 1.0
    first = results(clickhouse_store, originals)
    assert rows[hit]["output_text"] == first[originals[0]]["output_text"]
    for rid in (reversed_review, german, other_tenant):
        assert rows[rid]["cache_kind"] is None and rows[rid]["deduplicated_from"] is None, rid

    # What a subscriber of the model topics sees: every request but the hit.
    model_topics = [t for m in stack.catalog for t in stack.topics.model_topics(m.name)]
    ran = topic_keys(stack.settings, model_topics)
    assert sorted(ran) == sorted([*originals, reversed_review, german, other_tenant])

    history = clickhouse_store.query(
        "SELECT state, detail FROM sluice.request_status WHERE request_id = {r:String} ORDER BY at",
        {"r": hit},
    ).rows
    assert ("cached", f"semantic match of {originals[0]} (similarity {rows[hit]['similarity']:.3f})") in [
        tuple(r) for r in history
    ]
    ledger = clickhouse_store.query(savings_sql("sluice", f"tenant = '{tenant}'")).dicts()
    assert (ledger[0]["semantic_hits"], ledger[0]["cache_hits"], ledger[0]["duplicates"]) == (1, 0, 0)
    assert ledger[0]["saved_semantic_usd"] > 0

    # The index survives the router: killed, restarted by the stack, it still answers.
    router = next(c for c in stack.children if c.name == "processor")
    router.proc.send_signal(signal.SIGKILL)
    again = client.submit("Tell me the capital city of France.", tenant=tenant, max_tokens=8)
    client.flush()
    row = wait_until(
        lambda: results(clickhouse_store, [again]),
        lambda r: len(r) == 1,
        timeout=180,
        what="a result after the router restarted",
    )[again]
    assert (row["cache_kind"], row["deduplicated_from"]) == ("semantic", originals[0])


def test_static_vectors_do_not_depend_on_the_batch_or_the_models_padding(embedding_model_dir: Path) -> None:
    from stream_processors.embedding import MiniLMEmbedder

    embedder = MiniLMEmbedder(embedding_model_dir)
    alone = embedder.static([FRANCE])[0]
    batched = embedder.static([FRANCE, REVIEW * 3, *[GERMAN] * 20])[0]
    embedder.embed([REVIEW, FRANCE])  # the model's own tokenizer call changes its padding state
    after = embedder.static([FRANCE])[0]
    assert float(alone @ batched) == pytest.approx(1.0, abs=1e-6)
    assert float(alone @ after) == pytest.approx(1.0, abs=1e-6)
    # The cheap vector still ranks the paraphrase above an unrelated prompt.
    para, other = embedder.static([FRANCE_PARAPHRASE, "Write a regex that matches an IPv4 address."])
    assert float(alone @ para) > float(alone @ other)


def test_every_near_miss_family_runs_on_its_own(
    make_stack: Callable[..., LocalStack], clickhouse_store: Store, embedding_model_dir: Path
) -> None:
    stack = make_stack(**_SEMANTIC_ON)
    client = SluiceClient(stack.settings)
    originals = [client.submit(original, tenant="acme", max_tokens=8) for original, _ in NEAR_MISSES]
    client.flush()
    wait_until(lambda: results(clickhouse_store, originals), lambda r: len(r) == len(originals), timeout=180)
    _indexed(stack, originals)
    misses = [client.submit(near, tenant="acme", max_tokens=8) for _, near in NEAR_MISSES]
    paraphrase = client.submit(
        "Please summarize this ticket: the customer cannot log in after the update.", tenant="acme", max_tokens=8
    )
    client.flush()
    rows = wait_until(
        lambda: results(clickhouse_store, [*misses, paraphrase]), lambda r: len(r) == len(misses) + 1, timeout=120
    )
    for (_, near), rid in zip(NEAR_MISSES, misses, strict=True):
        assert rows[rid]["cache_kind"] is None and rows[rid]["deduplicated_from"] is None, near
    # Not vacuous: the same index answers a real paraphrase of the "log in" ticket.
    assert (rows[paraphrase]["cache_kind"], rows[paraphrase]["deduplicated_from"]) == ("semantic", originals[0])
    model_topics = [t for m in stack.catalog for t in stack.topics.model_topics(m.name)]
    assert set(misses) <= set(topic_keys(stack.settings, model_topics))
