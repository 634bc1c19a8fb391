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


def test_an_api_keys_quota_travels_with_its_requests_and_is_counted_on_its_own() -> None:
    from schemas import QUOTA_KEY, QUOTA_KEY_TOKENS

    ledger = QuotaLedger({})  # no tenant quota: only the key's counts
    keyed = {QUOTA_KEY: "key_1", QUOTA_KEY_TOKENS: "250"}
    r1, r2 = req(metadata=dict(keyed)), req(metadata=dict(keyed))
    e1 = ledger.admit(r1)
    assert e1 is not None and e1.key == "key_1" and ledger.admit(r2) is not None
    assert ledger.used_by_key("key_1") == 220
    with pytest.raises(PipelineRejection) as refused:
        ledger.admit(req(metadata=dict(keyed)))
    assert "API key key_1" in refused.value.detail and "quota of 250" in refused.value.detail
    # Another key of the same tenant, and the tenant itself, are not held back by it.
    assert ledger.admit(req(metadata={QUOTA_KEY: "key_2", QUOTA_KEY_TOKENS: "250"})) is not None
    assert ledger.admit(req()) is None
    assert ledger.key_usage() == {"key_1": (220, 250), "key_2": (110, 250)}
    # Released with its result; rebuilt from the topic with the key it was written with.
    assert ledger.release(r1.request_id) and ledger.used_by_key("key_1") == 110
    rebuilt = QuotaLedger({})
    rebuilt.apply(e1.request_id, Serde().decode(QuotaEntry, Serde().encode(e1)))
    assert rebuilt.used_by_key("key_1") == 110


def test_a_quota_entry_written_before_keys_had_quotas_still_reads() -> None:
    import io
    import struct

    from fastavro import schemaless_writer

    from schemas.registry import LocalSchemaRegistry

    entry = QuotaEntry.for_request(req())
    record = entry.to_avro()
    record.pop("key")
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", 17))
    schemaless_writer(buf, LocalSchemaRegistry().schema_for(17), record)
    decoded = Serde().decode(QuotaEntry, buf.getvalue())
    assert decoded.tokens == entry.tokens and decoded.key is None
    assert Serde().encode(entry)[1:5] == struct.pack(">I", 19)


def test_the_gateway_stamps_a_keys_quota_and_refuses_past_it(tmp_path: Path) -> None:
    from schemas import QUOTA_KEY, QUOTA_KEY_TOKENS

    settings = Settings(data_dir=tmp_path)
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    pub = MemoryPublisher()
    ledger = QuotaLedger({})
    services = Services(settings, keys, files, BatchService(settings, files, pub, None), pub, None, quota=ledger)
    client = TestClient(create_api(services))
    limited = {"Authorization": f"Bearer {keys.create('acme', token_quota=150)}"}
    other = {"Authorization": f"Bearer {keys.create('acme')}"}
    # A caller cannot set its own quota: its values are replaced by the key's.
    body = {
        "messages": [{"role": "user", "content": "x" * 40}],
        "max_tokens": 100,
        "metadata": {QUOTA_KEY: "key_forged", QUOTA_KEY_TOKENS: "99999999"},
    }
    assert client.post("/v1/async/chat/completions", headers=limited, json=body).status_code == 202
    stamped = pub.requests[0].metadata
    assert stamped[QUOTA_KEY].startswith("key_") and stamped[QUOTA_KEY] != "key_forged"
    assert stamped[QUOTA_KEY_TOKENS] == "150"
    ledger.admit(pub.requests[0])  # the router counted it
    over = client.post("/v1/async/chat/completions", headers=limited, json=body)
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
    # The tenant's other key has no quota: the same request goes through, without quota fields.
    assert client.post("/v1/async/chat/completions", headers=other, json=body).status_code == 202
    assert QUOTA_KEY not in pub.requests[-1].metadata and QUOTA_KEY_TOKENS not in pub.requests[-1].metadata


def test_a_key_with_a_quota_is_refused_where_key_quotas_are_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    pub = MemoryPublisher()
    services = Services(settings, keys, files, BatchService(settings, files, pub, None), pub, None, quota=None)
    client = TestClient(create_api(services))
    limited = {"Authorization": f"Bearer {keys.create('acme', token_quota=150)}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    refused = client.post("/v1/async/chat/completions", headers=limited, json=body)
    assert refused.status_code == 503 and "SLUICE_TENANTS__KEY_QUOTAS" in refused.json()["error"]["message"]
    assert not pub.requests  # not a silent pass
