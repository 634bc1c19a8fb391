"""The gateway over real HTTP on an embedded stack (instant engine: a test double for the plumbing):
tenants and limits, async requests, signed webhooks (verified with the ``standardwebhooks``
package), results on tenant and reply topics, and the ``sluice batch`` CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from analytics.store import Store
from core.settings import Settings
from core.topics import ensure_topics
from gateway.keys import KeyStore, keys_path
from gateway.webhooks import new_secret
from producers import SluiceClient
from schemas import InferenceResult, Serde, utcnow
from sluice.local.stack import LocalStack
from tests.integration.helpers import topic_records
from tests.support import run_cli, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SECRET = new_secret()


class Receiver:
    """A webhook receiver: ``/ok`` answers 204, ``/fail`` answers 500; every call is kept."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.calls.append((self.path, dict(self.headers), body))
                self.send_response(204 if self.path.startswith("/ok") else 500)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def events(self, path: str) -> list[dict[str, Any]]:
        """The verified payloads posted to ``path`` (verification raises on a bad signature)."""
        hook = Webhook(SECRET)
        return [hook.verify(body, headers) for p, headers, body in list(self.calls) if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def gw(settings: Settings, clickhouse_store: Store) -> Iterator[LocalStack]:
    p = settings.topic_prefix
    settings = settings.evolve(
        engine={"instant_token_seconds": 0.02},
        files={"max_lines": 20, "max_bytes": 64_000},
        gateway={"max_queued_per_tenant": 30, "batch_poll_s": 0.3},
        webhooks={
            "secrets": [SECRET],
            "first_retry_s": 0.2,
            "max_retry_s": 0.4,
            "retry_for_s": 2.0,
            "allow_private": ["127.0.0.1"],
        },
        tenants={
            "results_topics": {"team-a": f"{p}team-a.results"},
            "reply_to_patterns": {"team-a": [f"{p}team-a.replies.*"]},
        },
    )
    stack = LocalStack(settings, store=clickhouse_store, run_gateway=True).start()
    yield stack
    stack.stop()


def _client(stack: LocalStack, tenant: str) -> httpx.Client:
    key = KeyStore(keys_path(stack.settings)).create(tenant)
    return httpx.Client(base_url=f"{stack.gateway_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _jsonl(n: int, tokens: int = 4, prefix: str = "q") -> bytes:
    body = {"model": "tiny", "max_tokens": tokens}
    return "".join(
        json.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**body, "messages": [{"role": "user", "content": f"{prefix} question {i}"}]},
            }
        )
        + "\n"
        for i in range(n)
    ).encode()


def _upload(c: httpx.Client, data: bytes) -> httpx.Response:
    return c.post("/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})


def _done(c: httpx.Client, batch_id: str) -> dict[str, Any]:
    return wait_until(
        lambda: c.get(f"/batches/{batch_id}").json(),
        lambda b: b["status"] in ("completed", "failed", "expired", "cancelled"),
        timeout=90,
        what=f"batch {batch_id} to end",
    )


def test_tenants_see_only_their_own_and_limits_are_clear_4xx(gw: LocalStack) -> None:
    a, b = _client(gw, "team-a"), _client(gw, "team-b")
    anon = httpx.Client(base_url=f"{gw.gateway_url}/v1")
    assert anon.get("/batches").status_code == 401
    bad = anon.get("/batches", headers={"Authorization": "Bearer sk-sluice-not-a-key"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"

    f = _upload(a, _jsonl(3)).json()
    assert (f["object"], f["purpose"], f["bytes"]) == ("file", "batch", len(_jsonl(3)))
    batch = a.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions"}).json()
    for response in (
        b.get(f"/files/{f['id']}"),
        b.get(f"/files/{f['id']}/content"),
        b.delete(f"/files/{f['id']}"),
        b.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions"}),
        b.get(f"/batches/{batch['id']}"),
        b.post(f"/batches/{batch['id']}/cancel"),
    ):
        assert response.status_code == 404, response.text
    assert b.get("/batches").json()["data"] == [] and b.get("/files").json()["data"] == []
    assert [x["id"] for x in a.get("/files").json()["data"]] == [f["id"]]

    # A tenant's async request is invisible to the other tenant.
    rid = b.post(
        "/async/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).json()["id"]
    assert a.get(f"/requests/{rid}").status_code == 404
    assert wait_until(lambda: b.get(f"/requests/{rid}").json(), lambda r: r["status"] == "succeeded")["response"]

    too_many = _upload(a, _jsonl(21))
    assert too_many.status_code == 400 and "at most 20 lines" in too_many.json()["error"]["message"]
    too_big = _upload(a, b"x" * 70_000)
    assert too_big.status_code == 413 and "larger than 64000 bytes" in too_big.json()["error"]["message"]
    refused = a.post(
        "/async/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "tenant": "team-b", "max_tokens": 2},
    )
    assert refused.status_code == 400 and "tenant" in refused.json()["error"]["message"]

    # Queued-request limit (30): 20 slow requests queue, 20 more are refused while they run.
    slow = _upload(a, _jsonl(20, tokens=60, prefix="slow")).json()
    first = a.post("/batches", json={"input_file_id": slow["id"], "endpoint": "/v1/chat/completions"})
    assert first.status_code == 200
    second = a.post("/batches", json={"input_file_id": slow["id"], "endpoint": "/v1/chat/completions"})
    assert second.status_code == 429 and "limit of 30" in second.json()["error"]["message"]
    assert _done(a, batch["id"])["request_counts"] == {"total": 3, "completed": 3, "failed": 0, "at_risk": 0}
    cancelled = a.post(f"/batches/{first.json()['id']}/cancel").json()
    assert cancelled["status"] in ("cancelling", "cancelled")
    end = _done(a, first.json()["id"])
    assert end["status"] == "cancelled"
    counts = end["request_counts"]
    assert counts["total"] == 20 and counts["completed"] + counts["failed"] <= 20
    lines = len(a.get(f"/files/{end['error_file_id']}/content").text.splitlines()) if end["error_file_id"] else 0
    lines += len(a.get(f"/files/{end['output_file_id']}/content").text.splitlines()) if end["output_file_id"] else 0
    assert lines == 20  # one output or error line per input line, even for a cancelled batch


def test_webhooks_are_signed_retried_then_marked_failed_and_private_targets_refused(
    gw: LocalStack, receiver: Receiver, clickhouse_store: Store
) -> None:
    a = _client(gw, "team-a")
    hello = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    ok = a.post("/async/chat/completions", json={**hello, "webhook_url": f"{receiver.url}/ok"}).json()["id"]
    events = wait_until(lambda: receiver.events("/ok"), what="the signed webhook")
    assert events[0]["type"] == "request.completed" and events[0]["data"]["id"] == ok
    assert events[0]["data"]["response"]["object"] == "chat.completion"
    # A tampered body fails verification: the signature covers it.
    _, headers, body = next(c for c in receiver.calls if c[0] == "/ok")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"hello", b"HELLO") + b" ", headers)

    f = _upload(a, _jsonl(2)).json()
    batch = a.post(
        "/batches",
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "webhook_url": f"{receiver.url}/ok/b"},
    ).json()
    done = wait_until(lambda: receiver.events("/ok/b"), what="the batch webhook")
    assert done[0]["type"] == "batch.completed" and done[0]["data"]["id"] == batch["id"]

    failing = a.post("/async/chat/completions", json={**hello, "webhook_url": f"{receiver.url}/fail"}).json()["id"]
    db = gw.settings.clickhouse.database
    wait_until(
        lambda: clickhouse_store.query(
            f"SELECT count() FROM {db}.request_status WHERE request_id = {{id:String}} AND state = 'webhook_failed'",
            {"id": failing},
        ).rows[0][0],
        timeout=60,
        what="webhook_failed",
    )
    attempts = [c for c in receiver.calls if c[0] == "/fail"]
    assert len(attempts) >= 3  # retried with backoff for retry_for_s before giving up
    assert len({c[1]["webhook-id"] for c in attempts}) == 1  # a retry is the same message
    letters = clickhouse_store.query(
        f"SELECT reason, stage FROM {db}.dead_letters FINAL WHERE request_id = {{id:String}}", {"id": failing}
    ).rows
    assert letters == [["webhook_failed", "delivery"]] or letters == [("webhook_failed", "delivery")]
    # The result itself is intact.
    assert a.get(f"/requests/{failing}").json()["status"] == "succeeded"

    for target in ("http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x"):
        refused = a.post("/async/chat/completions", json={**hello, "webhook_url": target})
        assert refused.status_code == 400 and "private" in refused.json()["error"]["message"], target
    refused = a.post(
        "/batches",
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "webhook_url": "http://192.168.0.1/"},
    )
    assert refused.status_code == 400


def test_a_request_at_risk_is_announced_by_a_signed_webhook_before_it_ends(gw: LocalStack, receiver: Receiver) -> None:
    a = _client(gw, "team-a")
    # 400 tokens at 20 ms: 8 s of generation against a 4 s deadline.
    body = {
        "messages": [{"role": "user", "content": "a long answer, please"}],
        "max_tokens": 400,
        "deadline": (utcnow() + timedelta(seconds=4)).isoformat(),
        "webhook_url": f"{receiver.url}/ok/risk",
    }
    rid = a.post("/async/chat/completions", json=body).json()["id"]
    events = wait_until(
        lambda: receiver.events("/ok/risk"),
        lambda e: any(x["type"] == "request.failed" for x in e),
        timeout=60,
        what="the at-risk and failed webhooks",
    )
    types = [e["type"] for e in events]
    assert types.count("request.at_risk") == 1 and types.index("request.at_risk") < types.index("request.failed")
    at_risk = events[types.index("request.at_risk")]["data"]
    assert at_risk["id"] == rid and at_risk["status"] == "at_risk" and "tokens/s" in at_risk["detail"]


def test_results_reach_the_tenants_topic_and_an_allowed_reply_topic(gw: LocalStack, serde: Serde) -> None:
    s = gw.settings
    p = s.topic_prefix
    reply = f"{p}team-a.replies.svc"
    ensure_topics(s.kafka, {reply: {}})
    with SluiceClient(s) as client:
        allowed = client.submit("to my topic", tenant="team-a", reply_to=reply, max_tokens=2)
        refused = client.submit("to theirs", tenant="team-a", reply_to=f"{p}team-b.results", max_tokens=2)
        other = client.submit("not mine", tenant="team-b", max_tokens=2)
    on_reply = wait_until(
        lambda: topic_records(s, reply, InferenceResult, serde, quiet_s=1),
        timeout=90,
        interval=1.0,
        what="a result on the reply topic",
    )
    assert [r.request_id for r in on_reply] == [allowed]
    own_topic = f"{p}team-a.results"
    wait_until(lambda: len(topic_records(s, own_topic, InferenceResult, serde, quiet_s=1)) >= 2, timeout=60)
    own = {r.request_id: r for r in topic_records(s, own_topic, InferenceResult, serde, quiet_s=4)}
    assert set(own) == {allowed, refused}  # the tenant's own topic has all its results, nothing else
    assert own[refused].error is not None and own[refused].error.startswith("reply_to_refused:")
    assert other not in own


def test_sluice_batch_cli(gw: LocalStack, tmp_path: Path, clickhouse_store: Store) -> None:
    s: Settings = gw.settings
    path = tmp_path / "in.jsonl"
    unknown = json.loads(_jsonl(1, prefix="lost").decode())
    unknown["body"]["model"] = "no-such-model"
    path.write_bytes(_jsonl(4) + b'{"custom_id": "bad"}\n' + json.dumps(unknown).encode() + b"\n")
    submitted = run_cli(s, "batch", "submit", str(path), "--priority", "normal", "--metadata", "team=docs")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    waited = run_cli(s, "batch", "wait", batch_id, "--timeout", "90")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "completed, 4 completed, 2 failed of 6" in waited.stdout
    out = run_cli(s, "batch", "output", batch_id, "-o", str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(x)["custom_id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()) == [
        "q0",
        "q1",
        "q2",
        "q3",
    ]
    errors = [json.loads(x) for x in run_cli(s, "batch", "errors", batch_id).stdout.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("bad", "invalid_request"),
        ("lost0", "model_not_found"),
    ]
    listed = run_cli(s, "batch", "list", "--format", "json")
    assert [json.loads(x)["id"] for x in listed.stdout.splitlines()] == [batch_id]
    status = run_cli(s, "batch", "status", batch_id, "--format", "json")
    assert json.loads(status.stdout)["metadata"] == {"team": "docs"}
    missing = run_cli(s, "batch", "status", "batch_nope")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    db = s.clickhouse.database
    row = clickhouse_store.query(
        f"SELECT state, total, completed, failed FROM {db}.batches FINAL WHERE batch_id = {{b:String}}",
        {"b": batch_id},
    ).rows
    assert [tuple(r) for r in row] == [("completed", 6, 4, 2)]

    # The batch's failures replay: the unknown-model line, to a model that exists (the invalid
    # line is not a dead letter: replaying it could not succeed).
    replayed = run_cli(s, "dlq", "replay", "--batch", batch_id, "--to-model", "tiny", "--format", "json")
    assert replayed.returncode == 0, replayed.stderr
    actions = [json.loads(x) for x in replayed.stdout.splitlines()]
    assert [a["action"] for a in actions] == ["replayed"]
    wait_until(
        lambda: (
            clickhouse_store.query(
                f"SELECT status FROM {db}.results FINAL WHERE replay_of = {{r:String}}", {"r": f"{batch_id}-000005"}
            ).rows
        ),
        lambda rows: [tuple(r) for r in rows] == [("succeeded",)],
        what="the replayed request's result",
    )

    # A key made with the CLI is printed once and works at once.
    made = run_cli(s, "keys", "create", "--tenant", "team-z")
    key = made.stdout.strip()
    assert made.returncode == 0 and key.startswith("sk-sluice-")
    listed_z = httpx.get(f"{gw.gateway_url}/v1/batches", headers={"Authorization": f"Bearer {key}"})
    assert listed_z.status_code == 200 and listed_z.json()["data"] == []


def test_hostile_bodies_are_refused_before_publishing_and_the_stack_keeps_serving(gw: LocalStack) -> None:
    with _client(gw, "hostile") as c:
        huge = json.dumps({"messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]})
        deep = "[" * 100_000 + "]" * 100_000
        for url in ("/async/chat/completions", "/batches"):
            big = c.post(url, content=huge, headers={"Content-Type": "application/json"})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", big.text[:300]
            nested = c.post(url, content=deep, headers={"Content-Type": "application/json"})
            assert nested.status_code == 400 and "deeper than" in nested.json()["error"]["message"]
        long_prompt = c.post(
            "/async/chat/completions", json={"messages": [{"role": "user", "content": "y" * 300_000}], "max_tokens": 3}
        )
        assert long_prompt.status_code == 400 and long_prompt.json()["error"]["code"] == "context_length_exceeded"
        assert c.get("/batches").json()["data"] == []  # nothing was created
        ok = c.post("/async/chat/completions", json={"messages": [{"role": "user", "content": "still here?"}]})
        assert ok.status_code == 202, ok.text
        rid = ok.json()["id"]
        done = wait_until(
            lambda: c.get(f"/requests/{rid}").json(), lambda b: b.get("status") == "succeeded", timeout=90
        )
        assert done["id"] == rid
