"""The gateway refuses what it cannot carry before it publishes anything: bodies past the size
derived from the broker's record limit (413), deep nesting, values the wire format cannot hold,
text that is not valid Unicode, windows that overflow (400), all in OpenAI's error shape; a
failed batch create leaves nothing behind; and a bounded property-based fuzz of the OpenAPI
document finds no server error. In process, on the stub broker (no network)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from core.errors import BrokerError
from core.settings import Settings
from gateway.api import Services, create_api
from gateway.batches import BatchService
from gateway.files import FileMeta, LocalFileStore
from gateway.keys import KeyStore
from tests.gateway_doubles import MemoryPublisher

MB10 = 10 * 1024 * 1024


class RefusingPublisher(MemoryPublisher):
    """A broker that refuses everything (too large, or down)."""

    def flush(self, timeout: float = 30.0) -> None:
        raise BrokerError("cannot publish: Broker: Message size too large")


def _gateway(tmp_path: Path, publisher: MemoryPublisher | None = None) -> tuple[TestClient, dict[str, str], str]:
    settings = Settings(data_dir=tmp_path)
    keys = KeyStore(tmp_path / "keys.json")
    files = LocalFileStore(tmp_path / "files")
    pub = publisher or MemoryPublisher()
    services = Services(settings, keys, files, BatchService(settings, files, pub, None), pub, None)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": _chat()}
    data = json.dumps(line).encode() + b"\n"
    meta = FileMeta(tenant="acme", filename="in.jsonl", purpose="batch", bytes=len(data), lines=1)
    files.put(meta, io.BytesIO(data))
    client = TestClient(create_api(services), raise_server_exceptions=False)
    return client, {"Authorization": f"Bearer {keys.create('acme')}"}, meta.id


def _openai_error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


CHAT = "/v1/async/chat/completions"


def _chat(**more: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], **more}


def test_ten_megabytes_are_refused_with_413_on_every_write_endpoint(tmp_path: Path) -> None:
    client, auth, file_id = _gateway(tmp_path)
    big_prompt = json.dumps(_chat(messages=[{"role": "user", "content": "x" * MB10}]))
    big_metadata = json.dumps(_chat(metadata={"k": "v" * MB10}))
    for url, body in (
        (CHAT, big_prompt),
        (CHAT, big_metadata),
        ("/v1/batches", json.dumps({"input_file_id": file_id, "metadata": {"k": "v" * MB10}})),
    ):
        err = _openai_error(client.post(url, headers={**auth, "Content-Type": "application/json"}, content=body), 413)
        assert err["code"] == "request_too_large"

    # Without a Content-Length (chunked): refused while reading, all the same.
    def chunks() -> Any:
        for _ in range(11):
            yield b" " * (1024 * 1024)

    resp = client.post(CHAT, headers={**auth, "Content-Type": "application/json"}, content=chunks())
    _openai_error(resp, 413)
    assert client.get("/v1/batches", headers=auth).json()["data"] == []  # nothing left behind


@pytest.mark.parametrize("url", [CHAT, "/v1/batches"])
def test_deep_json_is_refused_without_a_server_error(tmp_path: Path, url: str) -> None:
    client, auth, _ = _gateway(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    err = _openai_error(client.post(url, headers={**auth, "Content-Type": "application/json"}, content=deep), 400)
    assert "deeper than" in err["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (_chat(seed=2**64), "seed"),
        (_chat(seed=-(2**63) - 1), "seed"),
        (_chat(max_tokens=10**12), "max_tokens"),
        (_chat(messages=[{"role": "user", "content": "x" * 300_000}]), "limit is 200000"),
        (_chat(metadata={f"k{i}": "v" for i in range(17)}), "16 pairs"),
        (_chat(metadata={"k" * 65: "v"}), "longer than 64"),
    ],
)
def test_values_the_wire_or_the_model_cannot_take_are_400_at_submission(
    tmp_path: Path, body: dict[str, Any], needle: str
) -> None:
    client, auth, _ = _gateway(tmp_path)
    err = _openai_error(client.post(CHAT, headers=auth, json=body), 400)
    assert needle in err["message"]


def test_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    client, auth, _ = _gateway(tmp_path)
    raw = '{"messages": [{"role": "user", "content": "\\ud800"}]}'
    err = _openai_error(client.post(CHAT, headers={**auth, "Content-Type": "application/json"}, content=raw), 400)
    assert "not valid Unicode" in err["message"]


@pytest.mark.parametrize("window", ["1000000000h", "99999999999999999999d", "31d", "0h", "soon"])
def test_completion_windows_that_overflow_or_make_no_sense_are_400(tmp_path: Path, window: str) -> None:
    client, auth, file_id = _gateway(tmp_path)
    resp = client.post("/v1/batches", headers=auth, json={"input_file_id": file_id, "completion_window": window})
    _openai_error(resp, 400)


def test_a_malformed_upload_is_an_openai_shaped_error(tmp_path: Path) -> None:
    client, auth, _ = _gateway(tmp_path)
    resp = client.post(
        "/v1/files", headers={**auth, "Content-Type": "multipart/form-data; boundary=x"}, content=b"--x\r\nbroken"
    )
    assert 400 <= resp.status_code < 500
    assert "detail" not in resp.json() and resp.json()["error"]["message"]


def test_a_batch_the_broker_refused_leaves_nothing_listed(tmp_path: Path) -> None:
    client, auth, file_id = _gateway(tmp_path, RefusingPublisher())
    resp = client.post("/v1/batches", headers=auth, json={"input_file_id": file_id})
    _openai_error(resp, 503)
    assert client.get("/v1/batches", headers=auth).json()["data"] == []


def test_every_write_endpoint_documents_its_body(tmp_path: Path) -> None:
    client, _, _ = _gateway(tmp_path)
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/batches", CHAT, "/v1/files"):
        assert "requestBody" in paths[path]["post"], path


def test_fuzzing_the_openapi_document_finds_no_server_error(tmp_path: Path) -> None:
    client, auth, _ = _gateway(tmp_path)
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    failures: list[str] = []
    calls: list[int] = []

    def fuzz(path: str) -> None:
        @hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(schema[path]["POST"].as_strategy())
        def check(case: Any) -> None:
            kwargs = case.as_transport_kwargs()
            headers = {**auth, **(kwargs.get("headers") or {})}
            resp = client.request("POST", path, headers=headers, json=kwargs.get("json"))
            calls.append(resp.status_code)
            if resp.status_code >= 500:
                failures.append(f"{path} {resp.status_code} {kwargs.get('json')!r:.300}")

        check()

    for path in ("/v1/batches", CHAT):
        fuzz(path)
    assert len(calls) >= 60  # it ran
    assert failures == []
