"""Enqueued-token quotas through the whole pipeline (instant engine with a per-token time): a
breach through the SDK (typed dead letter and failed result) and through HTTP (429 with
Retry-After), the ledger rebuilt after the router is killed, and tokens released as requests end."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from analytics.store import Store
from core.settings import Settings
from gateway.keys import KeyStore, keys_path
from producers import SluiceClient
from schemas import DeadLetter, InferenceResult, RequestStatus, Serde
from sluice.local.stack import LocalStack
from tests.integration.helpers import TopicCounter, topic_records
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

# Each request holds 10 (a 40-character prompt) + 50 (max_tokens) = 60 tokens; four fit in 250.
QUOTA = 250


def _prompt(i: int) -> str:
    return f"quota request {i:04d}".ljust(40, ".")


@pytest.fixture
def quota_stack(settings: Settings, clickhouse_store: Store) -> Iterator[LocalStack]:
    # 50 tokens of 500 ms: each request runs 25 s, so held tokens stay held across a router restart.
    settings = settings.evolve(
        engine={"instant_token_seconds": 0.5},
        tenants={"token_quotas": {"quota-t": QUOTA}},
    )
    stack = LocalStack(settings, store=clickhouse_store, run_gateway=True).start()
    yield stack
    stack.stop()


def _wait_routed(stack: LocalStack, serde: Serde, ids: list[str], what: str) -> None:
    """Until every one of ``ids`` has a ``routed`` status (the router has counted its tokens)."""
    wait_until(
        lambda: {
            s.request_id
            for s in topic_records(stack.settings, stack.topics.status, RequestStatus, serde, quiet_s=0.5)
            if s.state == "routed"
        },
        lambda routed: set(ids) <= routed,
        timeout=60,
        what=what,
    )


def _failed(stack: LocalStack, serde: Serde, rid: str) -> InferenceResult | None:
    for r in topic_records(stack.settings, stack.topics.results, InferenceResult, serde, quiet_s=1.0):
        if r.request_id == rid:
            return r
    return None


def test_quota_breaches_through_the_sdk_and_http_survive_a_router_restart(
    quota_stack: LocalStack, serde: Serde
) -> None:
    stack = quota_stack
    results = TopicCounter(stack.settings, stack.topics.results)
    key = KeyStore(keys_path(stack.settings)).create("quota-t")
    http = httpx.Client(base_url=f"{stack.gateway_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    try:
        with SluiceClient(stack.settings) as client:
            held = [
                client.submit(_prompt(i), model="tiny", tenant="quota-t", max_tokens=50, cache=False) for i in range(4)
            ]
            client.flush()
            # The four are admitted first: the router takes partitions in no fixed order, so the
            # fifth is sent only once all four are routed.
            _wait_routed(stack, serde, held, "the four routed")
            over = client.submit(_prompt(4), model="tiny", tenant="quota-t", max_tokens=50, cache=False)
            client.flush()
            # The SDK path: a failed result and a typed dead letter, at once (not after the others).
            result = wait_until(lambda: _failed(stack, serde, over), lambda r: r is not None, timeout=60, what="result")
            assert result is not None and result.status == "failed"
            assert (result.error or "").startswith("quota_exceeded"), result.error
            assert not any(results.counts()[rid] for rid in held)  # the four still hold their tokens
            dls = [
                d
                for d in topic_records(stack.settings, stack.topics.dead_letter, DeadLetter, serde, quiet_s=1.0)
                if d.request_id == over
            ]
            assert [d.reason for d in dls] == ["quota_exceeded"]

            # HTTP: refused before anything is published (the gateway follows the ledger topic).
            body = {"model": "tiny", "messages": [{"role": "user", "content": _prompt(5)}], "max_tokens": 50}
            refused = wait_until(
                lambda: http.post("/async/chat/completions", json=body),
                lambda r: r.status_code == 429,
                timeout=30,
                what="the gateway to see the tenant's held tokens",
            )
            assert refused.json()["error"]["code"] == "quota_exceeded" and refused.headers["retry-after"] == "60"

            # The router is killed and restarted by the stack: it rebuilds the ledger from its topic.
            router = next(c for c in stack.children if c.name == "processor")
            assert router.proc is not None
            router.proc.send_signal(signal.SIGKILL)
            after = client.submit(_prompt(6), model="tiny", tenant="quota-t", max_tokens=50, cache=False)
            client.flush()
            result = wait_until(
                lambda: _failed(stack, serde, after),
                lambda r: r is not None,
                timeout=120,
                what="a result after restart",
            )
            assert result is not None and (result.error or "").startswith("quota_exceeded"), result
            # The four finish; their tokens come back and the tenant is admitted again.
            wait_until(results.counts, lambda c: all(c[rid] for rid in held), timeout=120, what="the four")
            again = client.submit(_prompt(7), model="tiny", tenant="quota-t", max_tokens=50, cache=False)
            client.flush()
            result = wait_until(lambda: _failed(stack, serde, again), lambda r: r is not None, timeout=60, what="it")
            assert result is not None and result.status == "succeeded", result
            accepted = http.post("/async/chat/completions", json=body)
            assert accepted.status_code == 202, accepted.text
    finally:
        http.close()
        results.close()


def test_an_api_keys_token_quota_through_the_gateway_and_router(
    settings: Settings, clickhouse_store: Store, serde: Serde
) -> None:
    from gateway.keys import key_id
    from schemas import QuotaEntry

    # 50 tokens of 1 s: each request runs 50 s, so the two hold their tokens while the third is
    # tried, however slow the host. Two of 60 tokens fit the key's 130.
    settings = settings.evolve(engine={"instant_token_seconds": 1.0}, tenants={"key_quotas": True})
    stack = LocalStack(settings, store=clickhouse_store, run_gateway=True).start()
    keys = KeyStore(keys_path(stack.settings))
    limited, free = keys.create("key-t", token_quota=130), keys.create("key-t")
    results = TopicCounter(stack.settings, stack.topics.results)
    base = f"{stack.gateway_url}/v1"
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {limited}"}, timeout=30)
    other = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {free}"}, timeout=30)

    def body(i: int) -> dict[str, object]:
        return {"model": "tiny", "messages": [{"role": "user", "content": _prompt(i)}], "max_tokens": 50}

    try:
        held = [http.post("/async/chat/completions", json=body(i)) for i in range(2)]
        assert all(r.status_code == 202 for r in held), [r.text for r in held]
        ids = [r.json()["id"] for r in held]
        _wait_routed(stack, serde, ids, "the two routed")
        refused = wait_until(
            lambda: http.post("/async/chat/completions", json=body(2)),
            lambda r: r.status_code == 429,
            timeout=30,
            what="the gateway to see the key's held tokens",
        )
        assert (
            refused.json()["error"]["code"] == "quota_exceeded" and "API key key_" in refused.json()["error"]["message"]
        )
        assert not any(results.counts()[rid] for rid in ids)  # refused while the two still run
        # The tenant's other key is not held back by it.
        assert other.post("/async/chat/completions", json=body(3)).status_code == 202
        entries = [
            e
            for e in topic_records(stack.settings, stack.topics.quota_ledger, QuotaEntry, serde, quiet_s=1.0)
            if e.request_id in ids
        ]
        assert {e.key for e in entries} == {key_id(limited)}
        # The two finish: their tokens come back and the key is admitted again.
        wait_until(results.counts, lambda c: all(c[rid] for rid in ids), timeout=180, what="the two")
        accepted = wait_until(
            lambda: http.post("/async/chat/completions", json=body(4)),
            lambda r: r.status_code == 202,
            timeout=30,
            what="the key admitted again",
        )
        assert accepted.status_code == 202
    finally:
        http.close()
        other.close()
        results.close()
        stack.stop()
