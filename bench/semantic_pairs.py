"""A labelled set of prompt pairs for the semantic cache, built systematically (P9).

Each family is a prompt template with slots; every filled base prompt gets paraphrases (other
templates that deserve the same answer) and near misses that do not, one kind per family of
error an embedding blurs: negation, antonym, a function word swapped (in/out, on/off,
before/after, with/without, to/from), another entity, number, unit or language, and a reversed
direction. The set is built in memory (nothing generated is stored) and split once, by a hash of
the family and its slot values, into a tuning part and a test part: the rules and the threshold
may be tuned on the first only, and P9 reports the second.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["LabelledPair", "build_pairs", "split"]


@dataclass(frozen=True)
class LabelledPair:
    task: str
    family: str
    kind: str  # "paraphrase" or the near-miss kind
    cached: str
    asked: str
    same_answer: bool
    group: str  # the base prompt's family and slots: the unit of the split


@dataclass(frozen=True)
class _Family:
    name: str
    task: str
    base: str
    paraphrases: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]
    # (kind, template or None, slot swaps): a template to fill with the same slots, and/or slot
    # values replaced by their partner (``{slot: {value: other}}``).
    misses: tuple[tuple[str, str | None, dict[str, dict[str, str]]], ...]


_CITIES = (
    "France",
    "Germany",
    "Japan",
    "Brazil",
    "Canada",
    "Egypt",
    "Kenya",
    "Norway",
    "Peru",
    "India",
    "Chile",
    "Vietnam",
    "Poland",
    "Ghana",
)
_PARTNER_COUNTRY = {c: _CITIES[(i + 1) % len(_CITIES)] for i, c in enumerate(_CITIES)}

_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "capital",
        "chat",
        "What is the capital of {c}?",
        ("Tell me the capital city of {c}.", "Which city is the capital of {c}?", "What city is the capital of {c}?"),
        {"c": _CITIES},
        (("entity", None, {"c": _PARTNER_COUNTRY}),),
    ),
    _Family(
        "population",
        "chat",
        "What is the population of {c}?",
        ("How many people live in {c}?", "Tell me the population of {c}.", "What's the population of {c}?"),
        {"c": _CITIES},
        (("entity", None, {"c": _PARTNER_COUNTRY}),),
    ),
    _Family(
        "ticket",
        "summarization",
        "Summarize this ticket: the customer cannot {act} after the update.",
        (
            "Give a short summary of this ticket: the customer cannot {act} after the update.",
            "Summarise this ticket: the customer cannot {act} after the update.",
            "Please summarize this ticket: the customer cannot {act} after the update.",
        ),
        {
            "act": (
                "log in",
                "sign in",
                "turn on notifications",
                "switch on sync",
                "scroll up in the chat",
                "zoom in on photos",
                "check in online",
                "opt in to emails",
            )
        },
        (
            (
                "function word",
                None,
                {
                    "act": {
                        "log in": "log out",
                        "sign in": "sign out",
                        "turn on notifications": "turn off notifications",
                        "switch on sync": "switch off sync",
                        "scroll up in the chat": "scroll down in the chat",
                        "zoom in on photos": "zoom out on photos",
                        "check in online": "check out online",
                        "opt in to emails": "opt out of emails",
                    }
                },
            ),
            ("negation", "Summarize this ticket: the customer can {act} after the update.", {}),
            ("time", "Summarize this ticket: the customer cannot {act} before the update.", {}),
        ),
    ),
    _Family(
        "toggle",
        "chat",
        "How do I turn on {feature}?",
        ("How can I turn on {feature}?", "What are the steps to turn on {feature}?", "How do you turn on {feature}?"),
        {
            "feature": (
                "dark mode",
                "two-factor authentication",
                "automatic updates",
                "location sharing",
                "read receipts",
                "battery saver",
                "closed captions",
                "guest access",
                "spell check",
                "parental controls",
            )
        },
        (("function word", "How do I turn off {feature}?", {}), ("negation", "Why can't I turn on {feature}?", {})),
    ),
    _Family(
        "timing",
        "chat",
        "Should I {do} before {event}?",
        (
            "Is it better to {do} before {event}?",
            "Should I {do} before {event} or not?",
            "Is it a good idea to {do} before {event}?",
        ),
        {
            "do": ("eat", "stretch", "drink coffee", "water the plants", "take a shower", "warm up"),
            "event": ("running", "sunrise", "a long flight", "an exam"),
        },
        (("function word", "Should I {do} after {event}?", {}), ("negation", "Should I not {do} before {event}?", {})),
    ),
    _Family(
        "recipe",
        "chat",
        "Give me a recipe for pancakes with {x}.",
        (
            "Share a recipe for pancakes with {x}.",
            "I need a recipe for pancakes with {x}.",
            "Please give me a recipe for pancakes with {x}.",
        ),
        {"x": ("eggs", "milk", "sugar", "butter", "gluten", "bananas", "oats", "honey", "cinnamon", "yogurt")},
        (("function word", "Give me a recipe for pancakes without {x}.", {}),),
    ),
    _Family(
        "transfer",
        "chat",
        "How do I move money from my {a} account to my {b} account?",
        (
            "How can I move money from my {a} account to my {b} account?",
            "What is the way to move money from my {a} account to my {b} account?",
            "How do you move money from my {a} account to my {b} account?",
        ),
        {"a": ("checking", "savings", "brokerage"), "b": ("savings", "retirement", "joint")},
        (("direction", "How do I move money from my {b} account to my {a} account?", {}),),
    ),
    _Family(
        "translate",
        "translation",
        "Translate to {lang}: {sent}",
        ("Translate into {lang}: {sent}", "Please translate to {lang}: {sent}", "Translate this to {lang}: {sent}"),
        {
            "lang": ("French", "German", "Spanish", "Italian"),
            "sent": (
                "Where is the train station?",
                "The meeting starts at noon.",
                "I would like a cup of tea.",
                "Please close the door.",
                "The museum is closed today.",
                "My flight leaves tomorrow morning.",
                "How much does this jacket cost?",
                "We need more chairs for the party.",
            ),
        },
        (
            (
                "language",
                None,
                {"lang": {"French": "Dutch", "German": "Polish", "Spanish": "Portuguese", "Italian": "Greek"}},
            ),
        ),
    ),
    _Family(
        "convert",
        "reasoning",
        "Convert {n} {u} to {v}.",
        ("Please convert {n} {u} to {v}.", "Convert {n} {u} into {v}.", "Convert {n} {u} to {v}, please."),
        {
            "n": ("5", "12", "40", "7", "250"),
            "u": ("kilometers", "kilograms", "liters"),
            "v": ("meters", "grams", "milliliters"),
        },
        (
            ("direction", "Convert {n} {v} to {u}.", {}),
            ("number", None, {"n": {"5": "6", "12": "21", "40": "14", "7": "70", "250": "25"}}),
            ("unit", None, {"u": {"kilometers": "miles", "kilograms": "pounds", "liters": "gallons"}}),
        ),
    ),
    _Family(
        "review",
        "classification",
        "Is this review positive? The {item} was {good} and the staff were {nice}.",
        (
            "Is the following review positive? The {item} was {good} and the staff were {nice}.",
            "Classify whether this review is positive: The {item} was {good} and the staff were {nice}.",
            "Is this review positive or not? The {item} was {good} and the staff were {nice}.",
        ),
        {
            "item": ("food", "room", "coffee", "service", "breakfast", "pool"),
            "good": ("amazing", "excellent"),
            "nice": ("friendly", "helpful"),
        },
        (
            ("antonym", None, {"good": {"amazing": "awful", "excellent": "terrible"}}),
            ("antonym", None, {"nice": {"friendly": "rude", "helpful": "useless"}}),
        ),
    ),
    _Family(
        "code",
        "code",
        "Write a {lang} function that sorts a list of {things} in {order} order.",
        (
            "Write a {lang} function which sorts a list of {things} in {order} order.",
            "Please write a {lang} function that sorts a list of {things} in {order} order.",
            "Write me a {lang} function that sorts a list of {things} in {order} order.",
        ),
        {
            "lang": ("Python", "JavaScript", "Go"),
            "things": ("numbers", "names", "dates", "prices"),
            "order": ("ascending",),
        },
        (
            ("language", None, {"lang": {"Python": "Rust", "JavaScript": "Java", "Go": "Ruby"}}),
            ("antonym", None, {"order": {"ascending": "descending"}}),
        ),
    ),
    _Family(
        "extract",
        "extraction",
        "Extract the {field} from this email: {email}",
        (
            "Return the {field} from this email: {email}",
            "Extract the {field} from the following email: {email}",
            "Please extract the {field} from this email: {email}",
        ),
        {
            "field": ("sender name", "order number", "delivery date"),
            "email": (
                "Hi, this is Ana Ruiz; order 5521 will arrive on 3 May.",
                "Hello from Tom Wu, your order 7730 ships on 9 June.",
                "Dear team, Lena Park here about order 1209, due 21 July.",
            ),
        },
        (
            (
                "entity",
                None,
                {
                    "field": {
                        "sender name": "recipient name",
                        "order number": "invoice number",
                        "delivery date": "order date",
                    }
                },
            ),
        ),
    ),
    _Family(
        "speed",
        "reasoning",
        "A train travels {d} km in {h} hours. What is its average speed?",
        (
            "If a train travels {d} km in {h} hours, what is its average speed?",
            "A train covers {d} km in {h} hours. What is its average speed?",
            "A train travels {d} km in {h} hours. What's its average speed?",
        ),
        {"d": ("120", "300", "450"), "h": ("2", "3", "5")},
        (("number", None, {"d": {"120": "150", "300": "330", "450": "540"}}),),
    ),
)


def _fill(template: str, slots: dict[str, str]) -> str:
    return template.format(**slots)


def _bindings(family: _Family) -> Iterator[dict[str, str]]:
    names = list(family.slots)
    for values in itertools.product(*(family.slots[n] for n in names)):
        yield dict(zip(names, values, strict=True))


def build_pairs() -> list[LabelledPair]:
    """Every pair of every family, in a fixed order."""
    out: list[LabelledPair] = []
    for fam in _FAMILIES:
        for slots in _bindings(fam):
            group = f"{fam.name}:" + "|".join(f"{k}={v}" for k, v in sorted(slots.items()))
            base = _fill(fam.base, slots)
            for paraphrase in fam.paraphrases:
                out.append(LabelledPair(fam.task, fam.name, "paraphrase", base, _fill(paraphrase, slots), True, group))
            for kind, miss, swaps in fam.misses:
                changed = {k: swaps.get(k, {}).get(v, v) for k, v in slots.items()}
                if not miss and changed == slots:
                    continue  # this binding has no partner for the swap
                asked = _fill(miss or fam.base, changed)
                if asked != base:
                    out.append(LabelledPair(fam.task, fam.name, kind, base, asked, False, group))
    return out


def split(pairs: list[LabelledPair], part: str) -> list[LabelledPair]:
    """``part`` "tune" or "test": about half of the base prompts each, by a fixed hash of the
    family and slots (a base prompt's paraphrases and near misses stay together)."""
    if part not in ("tune", "test"):
        raise ValueError(f"part {part!r} is not tune or test")
    want = part == "test"
    return [p for p in pairs if (hashlib.sha256(p.group.encode()).digest()[0] % 2 == 1) == want]
