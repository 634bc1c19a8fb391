"""The synchronous tier without services: service tiers, the wait estimate, admission (429 with
nothing queued), waiting for the result, streaming chunks, the Responses API shapes, /v1/models.
The results reader is fed by hand, as the results topic would."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from analytics.results import output_line
from core.settings import Settings
from gateway.api import Services, create_api
from gateway.batches import BatchService
from gateway.capacity import Capacity
from gateway.files import LocalFileStore
from gateway.flex import Refused, Tier, tier_of
from gateway.keys import KeyInfo, KeyStore
from gateway.openai_format import LineError, parse_batch_line, request_from_responses_body
from gateway.waiting import ResultWaiter
from schemas import Endpoint, InferenceRequest, InferenceResult, Priority, ResultStatus, Serde, utcnow
from tests.gateway_doubles import MemoryPublisher

TIERS = Settings().gateway.service_tiers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finished(model: str = "m") -> InferenceResult:
    req = InferenceRequest(messages=[{"role": "user", "content": "x"}])
    return InferenceResult.for_request(
        req, model=model, status=ResultStatus.SUCCEEDED, started_at=utcnow(), engine_run_id="r"
    )


# -- tiers -------------------------------------------------------------------------------------


def test_service_tiers_map_to_priorities_and_a_key_may_remap_them() -> None:
    key = KeyInfo("acme")
    assert tier_of("flex", key, TIERS) == Tier("flex", Priority.LOW)
    assert tier_of(None, key, TIERS).name == "default" and tier_of(None, key, TIERS).priority is Priority.NORMAL
    assert tier_of("priority", key, TIERS).priority is Priority.HIGH
    assert tier_of("flex", KeyInfo("acme", {"flex": "normal"}), TIERS).priority is Priority.NORMAL
    with pytest.raises(Refused, match="service_tier must be one of"):
        tier_of("scale", key, TIERS)


# -- the wait estimate ------------------------------------------------------------------------


def test_the_wait_estimate_is_the_work_ahead_over_the_measured_rate() -> None:
    clock = Clock()
    lag = {Priority.HIGH: 2, Priority.NORMAL: 10, Priority.LOW: 500}
    cap = Capacity(Settings(), ["m"], lag=lambda: lag, clock=clock, window_s=60)
    cap.refresh()
    assert cap.estimated_wait(Priority.LOW) is None  # no rate measured yet: no estimate
    for _ in range(60):
        clock.now += 1
        cap.finished(finished())
    assert cap.rate() == pytest.approx(1.0)
    # Low waits behind everything; high only behind high.
    assert cap.estimated_wait(Priority.LOW) == pytest.approx(513)
    assert cap.estimated_wait(Priority.HIGH) == pytest.approx(3)
    # Cache hits and duplicates are not engine work.
    cap.finished(finished().model_copy(update={"deduplicated_from": "x"}))
    assert cap.rate() == pytest.approx(1.0)
    # The window slides: a minute without results, no rate.
    clock.now += 61
    assert cap.rate() is None


def test_no_lag_means_no_wait_and_unknown_lag_counts_the_calls_in_flight() -> None:
    clock = Clock()
    cap = Capacity(Settings(), ["m"], lag=lambda: {}, clock=clock)
    cap.refresh()
    assert cap.estimated_wait(Priority.LOW) == 0.0
    cap.in_flight[Priority.NORMAL] = 4
    clock.now += 10
    for _ in range(2):
        cap.finished(finished())
    assert cap.estimated_wait(Priority.LOW) == pytest.approx(5 / (2 / 10))
    assert cap.estimated_wait(Priority.HIGH) == 0.0


# -- the endpoints ----------------------------------------------------------------------------


class AnsweringPublisher(MemoryPublisher):
    """Publishes into memory; each request is answered on the results "topic" by ``answer``."""

    def __init__(self, waiter: ResultWaiter, answer: Any) -> None:
        super().__init__()
        self.waiter = waiter
        self.answer = answer

    def submit_request(self, request: InferenceRequest, *, traceparent: str | None = None) -> str:
        super().submit_request(request, traceparent=traceparent)
        result = self.answer(request)
        if result is not None:
            threading.Timer(0.05, self.waiter.deliver, [result]).start()
        return request.request_id


def echo(request: InferenceRequest) -> InferenceResult:
    text = json.dumps({"ok": True}) if request.response_format else "the answer"
    return InferenceResult.for_request(
        request,
        model="small",
        status=ResultStatus.SUCCEEDED,
        started_at=utcnow(),
        output_text=text,
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=3,
        engine_run_id="run",
    )


def make(
    tmp_path: Path, answer: Any = echo, lag: dict[Priority, int] | None = None
) -> tuple[TestClient, Any, dict[str, str], Capacity]:
    settings = Settings(data_dir=tmp_path)
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    clock = Clock()
    capacity = Capacity(settings, ["small"], lag=lambda: lag or {}, clock=clock)
    capacity.refresh()
    waiter = ResultWaiter(settings, Serde(), on_result=capacity.finished)
    pub = AnsweringPublisher(waiter, answer)
    services = Services(
        settings,
        keys,
        files,
        BatchService(settings, files, pub, None),
        pub,
        None,
        waiter=waiter,
        capacity=capacity,
        models=["small", "large"],
    )
    auth = {"Authorization": f"Bearer {keys.create('acme')}"}
    clock.now += 60
    return TestClient(create_api(services)), pub, auth, capacity


def test_chat_completions_waits_for_the_result_of_its_request(tmp_path: Path) -> None:
    client, pub, auth, _ = make(tmp_path)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "service_tier": "flex", "max_tokens": 9}
    r = client.post("/v1/chat/completions", headers=auth, json=body)
    assert r.status_code == 200, r.text
    obj = r.json()
    (req,) = pub.requests
    assert obj["object"] == "chat.completion" and obj["id"] == f"chatcmpl-{req.request_id}"
    assert obj["service_tier"] == "flex" and obj["model"] == "small"
    assert obj["choices"][0]["message"]["content"] == "the answer"
    assert obj["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert r.headers["x-request-id"] == req.request_id
    # Flex runs at low priority, with the caller's wait as its deadline, for the key's tenant.
    assert req.priority is Priority.LOW and req.tenant == "acme" and req.max_tokens == 9
    assert req.deadline is not None and 590 < (req.deadline - utcnow()).total_seconds() <= 600


def test_a_failed_result_is_an_openai_error_with_its_status(tmp_path: Path) -> None:
    def fail(request: InferenceRequest) -> InferenceResult:
        return echo(request).model_copy(
            update={"status": ResultStatus.FAILED, "error": "context_overflow: prompt too long", "output_text": ""}
        )

    client, _, auth, _ = make(tmp_path, fail)
    r = client.post("/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_an_estimated_wait_past_the_callers_limit_is_refused_at_once_with_nothing_queued(tmp_path: Path) -> None:
    client, pub, auth, capacity = make(tmp_path, lag={Priority.LOW: 1000})
    for _ in range(30):
        capacity.finished(finished())  # 30 results in the last 60 s: 0.5 per second
    body = {"messages": [{"role": "user", "content": "hi"}], "service_tier": "flex"}
    r = client.post("/v1/chat/completions", headers={**auth, "X-Sluice-Max-Wait": "60"}, json=body)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "resource_unavailable" and int(r.headers["Retry-After"]) >= 1
    assert pub.requests == []  # nothing queued, nothing billed
    # The same request at the default tier waits behind none of the low backlog.
    ok = client.post("/v1/chat/completions", headers=auth, json={**body, "service_tier": "default"})
    assert ok.status_code == 200 and pub.requests[0].priority is Priority.NORMAL
    bad = client.post("/v1/chat/completions", headers={**auth, "X-Sluice-Max-Wait": "soon"}, json=body)
    assert bad.status_code == 400


def test_stream_true_sends_openai_chunks_ending_with_done(tmp_path: Path) -> None:
    client, _, auth, _ = make(tmp_path)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", headers=auth, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "the answer"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 10


def test_unknown_fields_and_tiers_are_refused_by_name(tmp_path: Path) -> None:
    client, pub, auth, _ = make(tmp_path)
    r = client.post(
        "/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "x"}], "tools": []}
    )
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "x"}], "service_tier": "x"}
    )
    assert r.status_code == 400 and "service_tier" in r.json()["error"]["message"]
    r = client.post("/v1/responses", headers=auth, json={"input": "x", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    assert pub.requests == []


def test_responses_maps_input_instructions_and_json_schema_and_answers_a_response(tmp_path: Path) -> None:
    client, pub, auth, _ = make(tmp_path)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "is it?"}]}],
        "instructions": "answer in JSON",
        "max_output_tokens": 20,
        "text": {"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
        "service_tier": "flex",
    }
    r = client.post("/v1/responses", headers=auth, json=body)
    assert r.status_code == 200, r.text
    obj = r.json()
    (req,) = pub.requests
    assert [m.role for m in req.messages] == ["system", "user"] and req.messages[1].content == "is it?"
    assert req.max_tokens == 20 and json.loads(req.response_format or "")["json_schema"]["schema"] == schema
    assert obj["object"] == "response" and obj["status"] == "completed" and obj["service_tier"] == "flex"
    assert obj["output"][0]["content"][0] == {"type": "output_text", "text": '{"ok": true}', "annotations": []}
    assert obj["usage"]["input_tokens"] == 7 and obj["usage"]["output_tokens"] == 3


def test_responses_bodies_and_batch_lines() -> None:
    req = request_from_responses_body({"input": "hello", "model": "small"}, tenant="t")
    assert [(m.role, m.content) for m in req.messages] == [("user", "hello")] and req.model == "small"
    with pytest.raises(LineError, match="store=false"):
        request_from_responses_body({"input": "x", "store": False}, tenant="t")
    with pytest.raises(LineError, match="only messages"):
        request_from_responses_body({"input": [{"type": "function_call_output", "output": "1"}]}, tenant="t")
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {"input": "hi"}}).encode()
    cid, req = parse_batch_line(line, 1, tenant="t", request_id="r1", endpoint=Endpoint.RESPONSES)
    assert cid == "a" and req.messages[0].content == "hi"
    with pytest.raises(LineError, match="the batch's endpoint"):
        parse_batch_line(line, 1, tenant="t", request_id="r1")
    out = output_line(echo(req), "a", endpoint=Endpoint.RESPONSES)
    assert out["response"]["body"]["object"] == "response"


def test_models_lists_the_catalog_and_auto(tmp_path: Path) -> None:
    client, _, auth, _ = make(tmp_path)
    ids = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
    assert ids == ["auto", "small", "large"]
    assert client.get("/v1/models/large", headers=auth).json()["id"] == "large"
    assert client.get("/v1/models/nope", headers=auth).status_code == 404
    assert client.get("/v1/models").status_code == 401


def test_the_results_reader_starts_at_the_end_and_settles_the_awaited_result() -> None:
    import asyncio

    from core.kafka.stub import StubBroker
    from core.topics import Topics

    settings = Settings(topic_prefix="w.")
    serde = Serde()
    broker = StubBroker()
    results = Topics("w.").results
    broker.create_topic(results, partitions=2)
    old, new = echo(InferenceRequest(messages=[{"role": "user", "content": "a"}])), None
    broker.append(results, serde.encode(old), old.request_id.encode())
    seen: list[str] = []
    waiter = ResultWaiter(settings, serde, on_result=lambda r: seen.append(r.request_id), consumer=broker.consumer("w"))
    stop = threading.Event()
    thread = threading.Thread(target=waiter.run, args=(stop,), daemon=True)
    thread.start()
    assert waiter.ready.wait(5)

    async def call() -> InferenceResult:
        nonlocal new
        req = InferenceRequest(messages=[{"role": "user", "content": "b"}])
        future = waiter.expect(req.request_id)
        new = echo(req)
        broker.append(results, serde.encode(new), req.request_id.encode())
        return await asyncio.wait_for(future, 5)

    try:
        got = asyncio.run(call())
    finally:
        stop.set()
        thread.join(5)
    assert new is not None and got.request_id == new.request_id
    assert seen == [new.request_id]  # the result written before the reader started was not read
    assert waiter.waiting == 0


# -- retention ---------------------------------------------------------------------------------


def test_expired_files_answer_404_and_are_deleted(tmp_path: Path) -> None:
    import io
    from datetime import timedelta

    from gateway.files import FileMeta, LocalFileStore, delete_expired

    store = LocalFileStore(tmp_path / "files")
    old = FileMeta(tenant="acme", filename="a.jsonl", purpose="batch_output").expire_after(60)
    keep = FileMeta(tenant="acme", filename="b.jsonl", purpose="batch")
    for meta in (old, keep):
        store.put(meta, io.BytesIO(b"{}\n"))
    assert old.openai()["expires_at"] == int(old.created_at.timestamp()) + 60 and keep.openai()["expires_at"] is None
    assert delete_expired(store, utcnow()) == 0
    assert delete_expired(store, utcnow() + timedelta(seconds=61)) == 1
    assert store.meta(old.id) is None and store.meta(keep.id) is not None
    assert not (tmp_path / "files" / "data" / old.id).exists()


def test_expires_after_is_checked_and_an_expired_file_is_gone_at_once(tmp_path: Path) -> None:
    client, _, auth, _ = make(tmp_path)
    upload = {"file": ("a.jsonl", b'{"x": 1}\n')}
    ok = client.post(
        "/v1/files",
        headers=auth,
        files=upload,
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    )
    assert ok.status_code == 200 and ok.json()["expires_at"] == ok.json()["created_at"] + 3600
    short = client.post(
        "/v1/files",
        headers=auth,
        files=upload,
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "60"},
    )
    assert short.status_code == 400 and "between 3600 and 2592000" in short.json()["error"]["message"]
    bad = client.post(
        "/v1/batches",
        headers=auth,
        json={"input_file_id": ok.json()["id"], "output_expires_after": {"anchor": "last_active_at", "seconds": 3600}},
    )
    assert bad.status_code == 400 and "anchor" in bad.json()["error"]["message"]
    # A file whose time is up answers 404 before any sweep deletes it.
    from gateway.files import LocalFileStore

    store = LocalFileStore(tmp_path / "files")
    meta = store.meta(ok.json()["id"])
    assert meta is not None
    meta.expires_at = utcnow()
    (tmp_path / "files" / "meta" / f"{meta.id}.json").write_text(meta.model_dump_json())
    assert client.get(f"/v1/files/{meta.id}", headers=auth).status_code == 404
    assert client.get(f"/v1/files/{meta.id}/content", headers=auth).status_code == 404
    assert meta.id not in [f["id"] for f in client.get("/v1/files", headers=auth).json()["data"]]


def test_a_batch_status_written_before_output_expires_after_still_reads() -> None:
    import io
    import struct
    from datetime import timedelta

    from fastavro import schemaless_writer

    from schemas import BatchState, BatchStatus
    from schemas.registry import LocalSchemaRegistry

    old = LocalSchemaRegistry().schema_for(6)  # batch_status as the previous release wrote it
    batch = BatchStatus(
        batch_id="b", tenant="t", state=BatchState.COMPLETED, input_file_id="f", expires_at=utcnow() + timedelta(1)
    )
    record = batch.to_avro()
    record.pop("output_expires_after_s")
    record.pop("at_risk")
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", 6))
    schemaless_writer(buf, old, record)
    decoded = Serde().decode(BatchStatus, buf.getvalue())
    assert decoded.batch_id == "b" and decoded.output_expires_after_s is None and decoded.at_risk == 0
    # And as the release before this one wrote it (id 15: no at_risk count).
    record = batch.model_copy(update={"output_expires_after_s": 3600}).to_avro()
    record.pop("at_risk")
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", 15))
    schemaless_writer(buf, LocalSchemaRegistry().schema_for(15), record)
    decoded = Serde().decode(BatchStatus, buf.getvalue())
    assert decoded.output_expires_after_s == 3600 and decoded.at_risk == 0
    assert Serde().encode(batch)[1:5] == struct.pack(">I", 18)  # this release writes the new id
