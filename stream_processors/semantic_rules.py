"""The semantic cache's matching rules, free of any model so they are unit-tested alone.

Which requests may share an answer at all (:func:`signature`, :func:`compatible`), and the
lexical checks that veto an embedding match (:func:`lexical_veto`). A sentence embedding scores
"Translate to French" and "Translate to German", or a review and its opposite, as close as two
real paraphrases (all-MiniLM-L6-v2: 0.88-0.90 against 0.90 for "What is the capital of France?" /
"Tell me France's capital city."), so similarity alone cannot keep precision high; these checks
catch the differences an embedding blurs: a changed number, a negation, a relation or direction
word swapped ("log in"/"log out", "before"/"after", "to"/"from"), a swapped word order, a
substituted content word, or an added word that contrasts with one already there.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from core.catalog import ModelEntry
from schemas import InferenceRequest

__all__ = [
    "Difference",
    "answer_fingerprint",
    "compatible",
    "content_words",
    "difference",
    "lexical_veto",
    "matched_text",
    "numbers",
    "signature",
]

# Function words and the instruction vocabulary of the task types the classifier knows: a
# paraphrase swaps these freely ("Extract ..." / "Return ...", "Summarize" / "TL;DR").
_FRAMING_WORDS = """
a an the of to in on at for by with from into onto as is are was were be been being am do does did
this that these those it its and or but if then so than there here what which who whom whose how why
when where me my i you your we our us they them their he she his her please can could would should
will shall may might must give tell show provide write make list briefly short brief one-line line
following text sentence words word about some any each every all per explain explanation mean
meaning means define describe summarize summarise summary tl dr translate translation extract classify
label return find pull out rate assign get compute calculate solve work review rewrite refactor
convert use using step steps
"""
_NEGATION_WORDS = "not no never nor none neither without cannot can't don't doesn't isn't won't"
# Short words that carry a relation or a direction: "log in"/"log out", "turn on"/"turn off",
# "before"/"after", "to"/"from". An embedding barely sees them; a swap changes the question.
_RELATION_WORDS = """
in out on off up down before after to from over under above below inside outside upper lower
more less most least min max minimum maximum first last top bottom left right forward backward
since until ago later earlier past next previous north south east west
"""
# Spellings of one relation: "Translate to French" / "Translate into French".
_SAME_RELATION = {"into": "to", "onto": "on", "within": "in", "till": "until"}
_FRAMING = frozenset(_FRAMING_WORDS.split())
_NEGATIONS = frozenset(_NEGATION_WORDS.split())
_RELATIONS = frozenset(_RELATION_WORDS.split()) | frozenset(_SAME_RELATION)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*(?:[.,:][0-9]+)*")


def _norm(word: str) -> str:
    word = word.lower().replace("\u2019", "'")
    if word.endswith("'s"):
        word = word[:-2]
    # A crude stemmer: "hours"/"hour", "boils"/"boil"; enough to compare word sets.
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _words(text: str) -> list[str]:
    return [_norm(w) for w in _WORD.findall(text.replace("\u2019", "'"))]


@lru_cache(maxsize=65_536)
def _analysed(text: str) -> tuple[frozenset[str], tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """(negations, content words in order, words with digits, content and relation words in
    order) of a text; cached: indexed texts are compared often."""
    raw = [w.lower().replace("\u2019", "'") for w in _WORD.findall(text.replace("\u2019", "'"))]
    sequence = tuple(
        _SAME_RELATION.get(w, w) if w in _RELATIONS else _norm(w)
        for w in raw
        if w in _RELATIONS or _norm(w) not in _FRAMING
    )
    words = [_norm(w) for w in raw]
    content = tuple(w for w in words if w not in _FRAMING and w not in _RELATIONS)
    digits = frozenset(w for w in content if any(c.isdigit() for c in w))
    return frozenset(w for w in words if w in _NEGATIONS), content, digits, sequence


def numbers(text: str) -> frozenset[str]:
    """The words of a prompt that carry digits: two prompts match only with the same ones."""
    return _analysed(text)[2]


def content_words(text: str) -> list[str]:
    """The words that carry a prompt's content, in order (framing words dropped)."""
    return [w for w in _words(text) if w not in _FRAMING]


@dataclass(frozen=True)
class Difference:
    """How two prompts differ in content words: ``added`` are the words only one side has when
    the other side has no word of its own (else ``None``: a substitution, or the same words)."""

    veto: str | None
    added: frozenset[str] = frozenset()
    others: frozenset[str] = frozenset()


def difference(a: str, b: str) -> Difference:
    """The lexical comparison of two prompts; ``veto`` names why they cannot share an answer."""
    (na, ca, da, qa), (nb, cb, db, qb) = _analysed(a), _analysed(b)
    if na != nb:
        return Difference("negation differs")
    if da != db:
        return Difference("numbers differ")
    ra, rb = sorted(w for w in qa if w in _RELATIONS), sorted(w for w in qb if w in _RELATIONS)
    if ra != rb:
        return Difference("relation words differ")
    sa, sb = set(ca), set(cb)
    only_a, only_b = sa - sb, sb - sa
    if only_a and only_b:
        return Difference("content words substituted")
    # Counted, not only present: "Extract the order number … order 5521" / "Extract the invoice
    # number … order 5521" keeps the word "order" on both sides, once instead of twice.
    more_a, more_b = Counter(ca) - Counter(cb), Counter(cb) - Counter(ca)
    if more_a and more_b:
        return Difference("content words substituted")
    if not only_a and not only_b:
        # The same words in another order: "10 km to miles" / "10 miles to km", "from Paris to
        # Rome" / "to Paris from Rome".
        reordered = (ca != cb and len(ca) == len(cb)) or (qa != qb and sorted(qa) == sorted(qb))
        return Difference("word order differs" if reordered else None)
    added = only_a or only_b
    if len(added) > 1:
        return Difference("more than one content word added")
    return Difference(None, frozenset(added), frozenset((sb if only_a else sa) - added))


def lexical_veto(a: str, b: str) -> str | None:
    """Why ``a`` and ``b`` cannot share an answer on lexical grounds alone (``None``: they may)."""
    return difference(a, b).veto


def matched_text(request: InferenceRequest) -> str:
    """The part of a request compared semantically: its last message. Everything before it
    (system prompt, history) must be identical, which :func:`signature` enforces."""
    return request.messages[-1].content if request.messages else ""


def answer_fingerprint(model: ModelEntry) -> str:
    """What determines a model's answers (weights source and engine arguments, not its price):
    cached answers of a model whose fingerprint changed are no longer served."""
    raw = json.dumps({"source": model.source, "engine": model.engine.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def signature(request: InferenceRequest, fingerprint: str, *, include_sampled: bool) -> str | None:
    """Requests may share an answer only with the same signature: same model hint and route,
    same model fingerprint, same prior messages and the same parameters that shape the answer.
    ``None`` when the request must not be matched (sampled, unless ``include_sampled``)."""
    if request.route is None or not request.messages:
        return None
    if request.temperature > 0 and not include_sampled:
        return None
    sampled = request.temperature > 0
    content = {
        "hint": request.model,
        "model": request.route.model,
        "fingerprint": fingerprint,
        "prior": [[m.role, m.content] for m in request.messages[:-1]],
        "role": request.messages[-1].role,
        # Greedy decoding ignores these; a sampled answer is only reused under the same ones.
        "sampling": [request.temperature, request.top_p, request.seed] if sampled else None,
        "stop": request.stop,
        "response_format": request.response_format,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def compatible(*, cached_max_tokens: int, finish_reason: str | None, completion_tokens: int, max_tokens: int) -> bool:
    """A cached answer fits a request's ``max_tokens`` if it ended on its own within that limit,
    or was cut at exactly the same limit (a longer limit could have produced more)."""
    if finish_reason == "length":
        return cached_max_tokens == max_tokens
    return completion_tokens <= max_tokens
