"""The labelled set P9 measures the semantic cache on: large enough, every near-miss family the
cache must refuse, and a fixed split whose parts never share a base prompt."""

from __future__ import annotations

from collections import Counter

from bench.semantic_pairs import build_pairs, split
from stream_processors.semantic_rules import lexical_veto


def test_the_set_is_large_and_covers_every_near_miss_family() -> None:
    pairs = build_pairs()
    assert len(pairs) >= 1000
    kinds = Counter(p.kind for p in pairs)
    families = {"negation", "antonym", "function word", "entity", "number", "unit", "language", "direction"}
    assert {"paraphrase", *families} <= set(kinds)
    assert all(p.same_answer == (p.kind == "paraphrase") for p in pairs)
    assert all(p.cached != p.asked for p in pairs)


def test_the_split_is_fixed_and_keeps_each_base_prompt_on_one_side() -> None:
    pairs = build_pairs()
    tune, test = split(pairs, "tune"), split(pairs, "test")
    assert len(tune) + len(test) == len(pairs) and min(len(tune), len(test)) > 0.4 * len(pairs)
    assert not {p.group for p in tune} & {p.group for p in test}
    assert split(build_pairs(), "test") == test


def test_the_reported_function_word_pair_is_vetoed() -> None:
    (pair,) = [
        p
        for p in build_pairs()
        if p.kind == "function word" and "log in" in p.cached and "log out" in p.asked and "Summarize" in p.asked
    ]
    assert lexical_veto(pair.cached, pair.asked) == "relation words differ"
