"""Classify a request before routing: task type, size, and the capability tier it needs.

The classifier is a seam (:class:`Classifier`): the router only reads a :class:`Classification`,
so a learned classifier can replace :class:`RuleClassifier` without touching routing. The rules
are deliberately cheap and deterministic (no model call, the same input always classifies the
same way) and explain themselves in ``reason``, which travels in the event as ``route_reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from schemas import InferenceRequest

__all__ = ["Classification", "Classifier", "RuleClassifier", "estimate_tokens"]

# Per-message overhead of chat templates (role markers, separators), in tokens.
_MESSAGE_OVERHEAD = 4


def estimate_tokens(text_chars: int) -> int:
    # ~4 characters per token for English BPE vocabularies; cheap and deterministic.
    return (text_chars + 3) // 4


@dataclass(frozen=True)
class Classification:
    task_type: str
    required_tier: int
    estimated_input_tokens: int
    required_context: int
    reason: str


class Classifier(Protocol):
    def classify(self, request: InferenceRequest) -> Classification: ...


@dataclass(frozen=True)
class _Rule:
    task_type: str
    tier: int
    pattern: re.Pattern[str]


def _rule(task_type: str, tier: int, *words: str) -> _Rule:
    return _Rule(task_type, tier, re.compile("|".join(words), re.IGNORECASE))


# First match wins, so the harder task types come first: "summarize this stack trace" is code.
RULES: tuple[_Rule, ...] = (
    _rule(
        "code",
        2,
        r"```",
        r"\btraceback\b",
        r"\bstack trace\b",
        r"\bcode review\b",
        r"\brefactor",
        r"\bdef \w+\(",
        r"\bclass \w+[:(]",
        r"\bfunction\b",
        r"\bcompile",
        r"\bregex\b",
        r"\bSQL\b",
    ),
    _rule(
        "reasoning",
        2,
        r"\bstep by step\b",
        r"\bprove\b",
        r"\bproof\b",
        r"\bderive\b",
        r"\banaly[sz]e\b",
        r"\bexplain why\b",
        r"\bplan\b",
    ),
    _rule("summarization", 1, r"\bsummari[sz]e\b", r"\bsummary\b", r"\btl;?dr\b"),
    _rule("extraction", 1, r"\bextract\b", r"\bclassify\b", r"\bJSON\b", r"\blabel\b"),
    _rule("translation", 1, r"\btranslate\b", r"\btranslation\b"),
)


class RuleClassifier:
    """Keyword rules for the task type; ``metadata`` may pin ``task_type`` and ``tier``.

    ``long_input_tokens``: inputs at least this long need one tier more (long documents are
    where the smallest models lose the thread).
    """

    def __init__(self, rules: tuple[_Rule, ...] = RULES, long_input_tokens: int = 4000) -> None:
        self.rules = rules
        self.long_input_tokens = long_input_tokens

    def classify(self, request: InferenceRequest) -> Classification:
        text = "\n".join(m.content for m in request.messages)
        est_input = estimate_tokens(len(text)) + _MESSAGE_OVERHEAD * len(request.messages)
        task_type, tier, why = "chat", 1, "no task rule matched"
        for rule in self.rules:
            match = rule.pattern.search(text)
            if match:
                task_type, tier, why = rule.task_type, rule.tier, f"matched {match.group(0).strip()!r}"
                break
        if "task_type" in request.metadata:
            task_type, why = request.metadata["task_type"], "task_type from metadata"
        if est_input >= self.long_input_tokens:
            tier += 1
            why += f", long input (>= {self.long_input_tokens} tokens) needs one tier more"
        pinned = request.metadata.get("tier", "")
        if pinned.isdigit() and int(pinned) >= 1:
            tier, why = int(pinned), why + ", tier from metadata"
        required_context = est_input + request.max_tokens
        return Classification(
            task_type=task_type,
            required_tier=tier,
            estimated_input_tokens=est_input,
            required_context=required_context,
            reason=f"{task_type} ({why}); tier >= {tier}; ~{est_input} in + {request.max_tokens} out tokens",
        )
