"""Enqueued-token quotas: the ledger's arithmetic, the router's admission (a typed dead letter and
a failed result past the quota), rebuilding from the ledger topic's records, and the gateway's 429."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.catalog import Catalog
from core.quota import QuotaLedger
from core.settings import ProcessorSettings, Settings
from core.topics import Topics
from gateway.api import Services, create_api
from gateway.batches import BatchService
from gateway.files import LocalFileStore
from gateway.keys import KeyStore
from schemas import (
    ChatMessage,
    DeadLetter,
    DeadLetterReason,
    InferenceRequest,
    InferenceResult,
    PipelineRejection,
    QuotaEntry,
    Serde,
)
from stream_processors.pipeline import RequestPipeline
from tests.gateway_doubles import MemoryPublisher
from tests.support import model_entry


def req(tenant: str = "a", max_tokens: int = 100, content: str = "x" * 40, **kw: object) -> InferenceRequest:
    return InferenceRequest(
        tenant=tenant, messages=[ChatMessage(role="user", content=content)], max_tokens=max_tokens, **kw
    )


def test_tokens_are_held_until_released_and_a_tenant_without_quota_is_not_counted() -> None:
    ledger = QuotaLedger({"a": 300})
    r1, r2, r3 = req(), req(), req()  # 110 tokens each (40 characters ~ 10 tokens, + 100)
    assert r1.enqueued_tokens() == 110
    assert ledger.admit(r1) is not None and ledger.admit(r2) is not None
    assert ledger.used("a") == 220
    with pytest.raises(PipelineRejection) as refused:
        ledger.admit(r3)
    assert refused.value.reason is DeadLetterReason.QUOTA_EXCEEDED and "quota of 300" in refused.value.detail
    assert ledger.admit(r1) is None and ledger.used("a") == 220  # a redelivery is not counted twice
    assert ledger.release(r1.request_id) and not ledger.release(r1.request_id)
    assert ledger.admit(r3) is not None and ledger.used("a") == 220
    assert ledger.admit(req(tenant="free", max_tokens=30000)) is None  # no quota, nothing held
    assert ledger.usage() == {"a": 220}


def test_a_request_larger_than_the_whole_quota_is_refused_even_when_nothing_is_held() -> None:
    ledger = QuotaLedger({"a": 50})
    with pytest.raises(PipelineRejection):
        ledger.admit(req(max_tokens=100))
    assert ledger.used("a") == 0


def test_the_ledger_rebuilds_from_its_topic_records_tombstones_and_markers() -> None:
    ledger = QuotaLedger({"a": 1000})
    e1, e2 = QuotaEntry.for_request(req()), QuotaEntry.for_request(req())
    for key, entry in [
        (e1.request_id, e1),
        (e2.request_id, e2),
        ("marker-x", QuotaEntry(request_id="marker-x", tenant="", tokens=0)),
        (e1.request_id, None),
    ]:
        ledger.apply(key, entry)
    assert ledger.used("a") == e2.tokens
    ledger.apply(e2.request_id, e2)  # read back after the router counted it itself: once
    assert ledger.used("a") == e2.tokens


def test_the_router_refuses_past_the_quota_with_a_dead_letter_and_a_failed_result() -> None:
    serde, topics = Serde(), Topics("q.")
    catalog = Catalog(models=[model_entry("cheap", context_length=4000)])
    ledger = QuotaLedger({"a": 250})
    pipe = RequestPipeline(catalog, topics, serde, ProcessorSettings(), quota=ledger)
    first = pipe.process(serde.encode(req(cache=False)), topic=topics.requests("normal"), partition=0, offset=1)
    held = [o for o in first if o.topic == topics.quota_ledger]
    assert len(held) == 1 and isinstance(held[0].record, QuotaEntry) and held[0].record.tokens == 110
    pipe.process(serde.encode(req(cache=False)), topic=topics.requests("normal"), partition=0, offset=2)
    third = req(cache=False)
    out = pipe.process(serde.encode(third), topic=topics.requests("normal"), partition=0, offset=3)
    (dl,) = [o.record for o in out if o.topic == topics.dead_letter]
    (result,) = [o.record for o in out if o.topic == topics.results]
    assert isinstance(dl, DeadLetter) and dl.reason is DeadLetterReason.QUOTA_EXCEEDED
    assert isinstance(result, InferenceResult) and result.request_id == third.request_id
    assert (result.error or "").startswith("quota_exceeded")
    assert not any(o.topic.startswith("q.model.") for o in out)  # not routed


def test_the_gateway_answers_429_with_retry_after_before_publishing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    pub = MemoryPublisher()
    ledger = QuotaLedger({"acme": 150})
    services = Services(settings, keys, files, BatchService(settings, files, pub, None), pub, None, quota=ledger)
    client = TestClient(create_api(services))
    auth = {"Authorization": f"Bearer {keys.create('acme')}"}
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 100}
    assert client.post("/v1/async/chat/completions", headers=auth, json=body).status_code == 202
    ledger.admit(pub.requests[0])  # the router counted it (the gateway reads that from the ledger topic)
    over = client.post("/v1/async/chat/completions", headers=auth, json=body)
    assert over.status_code == 429 and over.headers["Retry-After"] == "60"
    assert over.json()["error"]["code"] == "quota_exceeded" and len(pub.requests) == 1
    ledger.release(pub.requests[0].request_id)
    assert client.post("/v1/async/chat/completions", headers=auth, json=body).status_code == 202


def test_an_unreadable_ledger_record_is_skipped_and_the_rest_applied() -> None:
    from core.quota import _apply

    class Msg:
        def __init__(self, key: bytes, value: bytes | None) -> None:
            self._k, self._v = key, value

        def key(self) -> bytes:
            return self._k

        def value(self) -> bytes | None:
            return self._v

    serde, ledger = Serde(), QuotaLedger({"a": 1000})
    good = QuotaEntry.for_request(req())
    _apply(ledger, serde, Msg(b"bad", b"\x00\x00\x00\x00\x99garbage"))
    _apply(ledger, serde, Msg(good.request_id.encode(), serde.encode(good)))
    assert ledger.used("a") == good.tokens
