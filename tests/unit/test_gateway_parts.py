"""Gateway parts without services: OpenAI body parsing, Standard Webhooks signatures, SSRF checks,
hashed API keys, upload limits, and a batch's life with an in-memory publisher and result store."""

from __future__ import annotations

import io
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook

from analytics.results import output_line
from core.settings import Settings
from gateway.api import Services, create_api
from gateway.batches import BatchService, QuotaExceeded, request_id_for
from gateway.files import FileMeta, LocalFileStore, iter_lines
from gateway.keys import KeyStore, hash_key
from gateway.openai_format import LineError, parse_batch_line, request_from_body
from gateway.webhooks import TargetRefused, check_target, new_secret, sign
from schemas import (
    BatchState,
    BatchStatus,
    InferenceResult,
    ResultStatus,
    utcnow,
)
from tests.gateway_doubles import MemoryPublisher, MemoryResults

# -- OpenAI bodies ---------------------------------------------------------------------------


def test_a_chat_body_maps_field_by_field() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req = request_from_body(
        {
            "model": "auto",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "END",
            "n": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "metadata": {"k": "v"},
        },
        tenant="acme",
    )
    assert req.model is None  # "auto": cheapest capable
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "hi there")]
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (7, 0.5, 0.9, 3, ["END"])
    assert json.loads(req.response_format or "")["json_schema"]["schema"] == schema
    assert req.tenant == "acme" and req.metadata == {"k": "v"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "unsupported field(s) logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tenant": "other"}, "unsupported field(s) tenant"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ],
)
def test_a_bad_body_is_a_clear_error(body: dict[str, Any], message: str) -> None:
    with pytest.raises(LineError, match=None) as err:
        request_from_body(body, tenant="acme")
    assert message in str(err.value)


def test_a_batch_line_error_keeps_its_custom_id() -> None:
    line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/embeddings", "body": {}})
    with pytest.raises(LineError) as err:
        parse_batch_line(line.encode(), 3, tenant="t", request_id="r")
    assert err.value.custom_id == "c1" and str(err.value).startswith("line 3: url must be /v1/chat/completions")
    with pytest.raises(LineError) as err:
        parse_batch_line(b"{nope", 4, tenant="t", request_id="r")
    assert err.value.custom_id is None and "not a JSON object" in str(err.value)


def test_output_lines_have_openais_shape() -> None:
    t = utcnow()
    base = {"request_id": "r1", "tenant": "t", "priority": "low", "model": "m", "created_at": t}
    ok = InferenceResult(
        **base,
        status=ResultStatus.SUCCEEDED,
        output_text="hi",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        started_at=t,
        completed_at=t,
        custom_id="c1",
    )
    line = output_line(ok)
    assert line["custom_id"] == "c1" and line["error"] is None
    assert line["response"]["body"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    bad = ok.model_copy(update={"status": ResultStatus.FAILED, "error": "context_overflow: too long"})
    assert output_line(bad)["error"] == {"code": "context_length_exceeded", "message": "context_overflow: too long"}


# -- Webhooks ---------------------------------------------------------------------------------


def test_signatures_verify_with_the_reference_package_during_a_rotation() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"type":"request.completed"}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(utcnow().timestamp()))}
    headers["webhook-signature"] = sign([new, old], "msg_1", int(headers["webhook-timestamp"]), body)
    assert Webhook(old).verify(body, headers) == {"type": "request.completed"}
    assert Webhook(new).verify(body, headers) == {"type": "request.completed"}
    with pytest.raises(Exception):  # noqa: B017 - the package raises its own verification error
        Webhook(new_secret()).verify(body, headers)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x", "http://10.0.0.7/", "http://169.254.169.254/latest", "http://[::1]/", "ftp://example.com/"],
)
def test_internal_targets_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url, [])


def test_allow_listed_targets_pass() -> None:
    check_target("http://127.0.0.1:8080/hook", ["127.0.0.1"])
    check_target("http://10.0.0.7/hook", ["10.0.0.0/8"])


# -- Keys and uploads -------------------------------------------------------------------------


def test_keys_are_stored_hashed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key = store.create("acme")
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and hash_key(key) in text
    assert os.stat(tmp_path / "keys.json").st_mode & 0o777 == 0o600
    assert store.tenant_for(key) == "acme" and store.tenant_for(key + "x") is None


def test_iter_lines_skips_blank_lines_across_chunks() -> None:
    assert list(iter_lines(iter([b"a\n\nb", b"c\r\n", b"  \n", b"d"]))) == [b"a", b"bc", b"d"]


# -- A batch's life ---------------------------------------------------------------------------


def _service(tmp_path: Path, **gateway: Any) -> tuple[BatchService, MemoryPublisher, MemoryResults, LocalFileStore]:
    settings = Settings(data_dir=tmp_path).evolve(gateway=gateway)
    files = LocalFileStore(tmp_path / "files")
    pub, results = MemoryPublisher(), MemoryResults()
    return BatchService(settings, files, pub, results), pub, results, files


def _file(files: LocalFileStore, lines: list[str], tenant: str = "acme") -> FileMeta:
    data = ("\n".join(lines) + "\n").encode()
    meta = FileMeta(tenant=tenant, filename="in.jsonl", purpose="batch", bytes=len(data), lines=len(lines))
    files.put(meta, io.BytesIO(data))
    return meta


def _line(i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2}
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def _states(pub: MemoryPublisher, batch_id: str) -> list[str]:
    return [r.state.value for _, k, r in pub.records if isinstance(r, BatchStatus) and k == batch_id]


def test_a_batch_runs_validating_in_progress_finalizing_completed(tmp_path: Path) -> None:
    svc, pub, results, files = _service(tmp_path)
    meta = _file(files, [_line(0), "not json", _line(2)])
    batch = svc.create("acme", meta.id, priority="normal", metadata={"k": "v"})
    svc.join(10)
    assert [r.request_id for r in pub.requests] == [request_id_for(batch.batch_id, i) for i in (0, 2)]
    assert all(r.deadline == batch.expires_at and r.batch_id == batch.batch_id for r in pub.requests)
    rejected = [r for _, _, r in pub.records if isinstance(r, InferenceResult)]
    assert [(r.request_id, r.status) for r in rejected] == [(request_id_for(batch.batch_id, 1), ResultStatus.FAILED)]
    results.rows[rejected[0].request_id] = rejected[0]
    svc.poll_once()
    assert svc.get("acme", batch.batch_id).state is BatchState.IN_PROGRESS
    results.answer(pub.requests[0])
    results.answer(pub.requests[1], ok=False)
    svc.poll_once()
    done = svc.get("acme", batch.batch_id)
    assert done.state is BatchState.COMPLETED and (done.total, done.completed, done.failed) == (3, 1, 2)
    # Each change of the counts is published (the status topic is the progress feed).
    assert _states(pub, batch.batch_id) == [
        "validating",
        "in_progress",
        "in_progress",
        "in_progress",
        "finalizing",
        "completed",
    ]
    assert done.output_file_id is not None and done.error_file_id is not None
    out = [json.loads(x) for x in b"".join(files.chunks(done.output_file_id)).splitlines()]
    err = [json.loads(x) for x in b"".join(files.chunks(done.error_file_id)).splitlines()]
    assert [o["custom_id"] for o in out] == ["c0"]
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [(None, "invalid_request"), ("c2", "server_error")]


def test_an_expired_batch_returns_what_finished_and_one_error_line_per_request_left(tmp_path: Path) -> None:
    svc, pub, results, files = _service(tmp_path, expiry_grace_s=0)
    meta = _file(files, [_line(i) for i in range(4)])
    batch = svc.create("acme", meta.id, completion_window="1h")
    svc.join(10)
    results.answer(pub.requests[1])
    # The completion window has passed.
    svc._batches[batch.batch_id] = svc._batches[batch.batch_id].model_copy(
        update={"expires_at": utcnow() - timedelta(seconds=1)}
    )
    svc.poll_once()
    done = svc.get("acme", batch.batch_id)
    assert done.state is BatchState.EXPIRED and done.completed == 1
    assert done.output_file_id is not None and done.error_file_id is not None
    err = [json.loads(x) for x in b"".join(files.chunks(done.error_file_id)).splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [
        ("c0", "batch_expired"),
        ("c2", "batch_expired"),
        ("c3", "batch_expired"),
    ]


def test_another_tenants_file_is_not_found_and_the_queue_limit_holds(tmp_path: Path) -> None:
    svc, _, _, files = _service(tmp_path, max_queued_per_tenant=5)
    meta = _file(files, [_line(i) for i in range(4)])
    with pytest.raises(Exception, match="no file"):
        svc.create("other", meta.id)
    svc.create("acme", meta.id)
    svc.join(10)
    with pytest.raises(QuotaExceeded, match="limit of 5"):
        svc.create("acme", meta.id)


def test_uploads_count_lines_and_refuse_past_the_limits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings = settings.evolve(files={"max_lines": 3})
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    services = Services(
        settings, keys, files, BatchService(settings, files, MemoryPublisher(), None), MemoryPublisher(), None
    )
    client = TestClient(create_api(services))
    auth = {"Authorization": f"Bearer {keys.create('acme')}"}
    ok = client.post("/v1/files", headers=auth, files={"file": ("a.jsonl", b"a\n\nb\nc")}, data={"purpose": "batch"})
    assert ok.status_code == 200 and files.meta(ok.json()["id"]).lines == 3  # type: ignore[union-attr]
    over = client.post(
        "/v1/files", headers=auth, files={"file": ("a.jsonl", b"a\nb\nc\nd\n")}, data={"purpose": "batch"}
    )
    assert over.status_code == 400 and "at most 3 lines" in over.json()["error"]["message"]
    assert [m.id for m in files.list("acme")] == [ok.json()["id"]]  # the refused upload left nothing
    assert client.get("/v1/files", headers={"Authorization": "Bearer nope"}).status_code == 401
