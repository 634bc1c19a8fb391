"""Table-driven classifier and router decisions."""

from __future__ import annotations

import pytest

from core.catalog import Catalog, ModelEntry
from core.errors import DeadLetterReason, PipelineRejection
from schemas import ChatMessage, InferenceRequest, Priority
from stream_processors.classifier import RuleClassifier
from stream_processors.router import Backlog, Router


def model(name: str, tier: int, ctx: int, price: float, **kw: object) -> ModelEntry:
    return ModelEntry.model_validate(
        {
            "name": name,
            "source": "x",
            "tier": tier,
            "context_length": ctx,
            "input_price_per_1m": price,
            "output_price_per_1m": 2 * price,
            **kw,
        }
    )


CHEAP = model("cheap", 1, 1000, 0.1)
MID = model("mid", 2, 8000, 0.5)
BIG = model("big", 3, 32000, 1.0)
CATALOG = Catalog(models=[BIG, MID, CHEAP])


def req(content: str = "hello", **kw: object) -> InferenceRequest:
    return InferenceRequest.model_validate({"messages": [ChatMessage(role="user", content=content)], **kw})


@pytest.mark.parametrize(
    ("content", "metadata", "task", "tier"),
    [
        ("What is the capital of France?", {}, "chat", 1),
        ("Summarize this memo for the team.", {}, "summarization", 1),
        ("Extract the dates as JSON.", {}, "extraction", 1),
        ("Translate 'bonjour' to English.", {}, "translation", 1),
        ("Please do a code review of def parse(x): return x", {}, "code", 2),
        ("Summarize this traceback: Traceback (most recent call last)", {}, "code", 2),
        ("Explain why the sky is blue, step by step.", {}, "reasoning", 2),
        ("hello", {"tier": "3"}, "chat", 3),
        ("hello", {"task_type": "legal"}, "legal", 1),
        ("word " * 4000, {}, "chat", 2),
    ],
)
def test_classifier_rules(content: str, metadata: dict[str, str], task: str, tier: int) -> None:
    c = RuleClassifier().classify(req(content, metadata=metadata))
    assert (c.task_type, c.required_tier) == (task, tier)
    assert c.required_context == c.estimated_input_tokens + 256
    assert task in c.reason and f"tier >= {tier}" in c.reason


def test_classifier_is_deterministic() -> None:
    r = req("Refactor this function please")
    assert RuleClassifier().classify(r) == RuleClassifier().classify(r)


@pytest.mark.parametrize(
    ("request_", "catalog", "expected", "reason_part"),
    [
        (req("What is Kafka?"), CATALOG, "cheap", "cheapest capable: cheap"),
        (req("Please review this code: def f(): pass"), CATALOG, "mid", "tier >= 2"),
        (req("prove it", metadata={"tier": "3"}), CATALOG, "big", "cheapest capable: big"),
        (req(max_tokens=999), CATALOG, "mid", "cheapest capable: mid"),
        (req("x" * 40_000), CATALOG, "big", "cheapest capable: big"),
        (req(model="big"), CATALOG, "big", "explicit"),
        # No tier-3 model: the highest tier that fits serves it, and the reason says so.
        (req("x", metadata={"tier": "3"}), Catalog(models=[CHEAP, MID]), "mid", "best is tier 2"),
        # Failover: an unavailable cheapest model is skipped.
        (
            req("hi"),
            Catalog(models=[model("cheap", 1, 1000, 0.1, available=False), MID, BIG]),
            "mid",
            "failover past cheap unavailable",
        ),
    ],
)
def test_router_picks_the_cheapest_capable_model(
    request_: InferenceRequest, catalog: Catalog, expected: str, reason_part: str
) -> None:
    route = Router(catalog).route(request_)
    assert route.model == expected and reason_part in route.reason
    assert route.estimated_input_tokens > 0 and route.task_type


def test_router_fails_over_when_the_cheap_model_is_over_its_backlog() -> None:
    limited = model("cheap", 1, 1000, 0.1, max_backlog=2)
    backlog = Backlog()
    router = Router(Catalog(models=[limited, MID]), backlog=backlog)
    assert router.route(req()).model == "cheap"
    backlog.routed("cheap")
    backlog.routed("cheap")
    route = router.route(req())
    assert route.model == "mid" and "backlog 2 >= 2" in route.reason
    backlog.completed("cheap")
    assert router.route(req()).model == "cheap"


def test_router_queues_on_the_cheapest_when_every_capable_model_is_over_backlog() -> None:
    backlog = Backlog()
    router = Router(
        Catalog(models=[model("a", 1, 1000, 0.1, max_backlog=1), model("b", 1, 1000, 0.2, max_backlog=1)]),
        backlog=backlog,
    )
    backlog.routed("a")
    backlog.routed("b")
    route = router.route(req())
    assert route.model == "a" and "all over backlog" in route.reason


@pytest.mark.parametrize(
    ("request_", "catalog", "reason"),
    [
        (req(model="nope"), CATALOG, DeadLetterReason.UNKNOWN_MODEL),
        (req(model="cheap", max_tokens=2000), CATALOG, DeadLetterReason.CONTEXT_OVERFLOW),
        (req("x" * 200_000), CATALOG, DeadLetterReason.CONTEXT_OVERFLOW),
        (req(), Catalog(models=[model("cheap", 1, 1000, 0.1, available=False)]), DeadLetterReason.UNKNOWN_MODEL),
    ],
)
def test_router_rejections(request_: InferenceRequest, catalog: Catalog, reason: DeadLetterReason) -> None:
    with pytest.raises(PipelineRejection) as err:
        Router(catalog).route(request_)
    assert err.value.reason is reason


def test_a_router_counts_only_its_own_share_of_the_results() -> None:
    # With two router workers each sees every result; only those of requests it routed count.
    backlog = Backlog()
    backlog.routed("m", "a", priority=Priority.LOW)
    backlog.routed("m", "b", priority=Priority.LOW)
    assert not backlog.completed("m", "routed-by-the-other-worker")
    assert backlog.get("m") == 2 and backlog.ahead("m", Priority.LOW) == 2
    assert backlog.completed("m", "a") and backlog.get("m") == 1
    assert not backlog.completed("m", "a")  # a redelivered result counts once
    assert backlog.completed("m", "b") and backlog.get("m") == 0


def test_requests_past_the_tracking_cap_are_still_counted_out() -> None:
    backlog = Backlog(max_tracked=1)
    backlog.routed("m", "a")
    backlog.routed("m", "b")  # past the cap
    assert backlog.get("m") == 2
    assert backlog.completed("m", "b") and backlog.completed("m", "a") and backlog.get("m") == 0
