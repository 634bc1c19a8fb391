"""The query path is read-only and authenticated: through ``sluice sql`` and the raw endpoint,
destructive SQL, writes and table functions that reach files or the network are refused; a request
without the stack's token is refused; a table dropped by hand is re-created by the sink."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from analytics.store import Store
from core.errors import StoreError
from producers import SluiceClient
from sluice.local.stack import LocalStack
from tests.integration.helpers import result_counts
from tests.support import run_cli, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _post(stack: LocalStack, sql: str, token: str | None) -> tuple[int, dict[str, object]]:
    assert stack.query_server is not None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"{stack.query_server.url}/query", data=json.dumps({"sql": sql}).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_raw_endpoint_needs_the_token_and_only_reads(stack: LocalStack) -> None:
    path = stack.settings.data_dir / "query.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text()
    db = stack.settings.clickhouse.database
    assert _post(stack, "SELECT 1 AS one", None)[0] == 401
    assert _post(stack, "SELECT 1 AS one", "not-the-token")[0] == 401
    assert _post(stack, "SELECT 1 AS one", token) == (200, {"columns": ["one"], "rows": [[1]]})
    for sql in (
        f"DROP TABLE {db}.cost_metrics",
        f"INSERT INTO {db}.request_status (request_id, state, at) VALUES ('x', 'queued', now())",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')",
        f"WITH 1 AS x SELECT * FROM {db}.results SETTINGS readonly = 0",
    ):
        code, body = _post(stack, sql, token)
        assert code == 400 and "read" in str(body["error"]).lower(), (sql, body)
    assert _post(stack, f"SELECT count() FROM {db}.cost_metrics", token)[0] == 200  # still there


def test_sluice_sql_refuses_writes_and_file_access(stack: LocalStack) -> None:
    db = stack.settings.clickhouse.database
    dropped = run_cli(stack.settings, "sql", f"DROP TABLE {db}.cost_metrics")
    assert dropped.returncode == 1 and "read-only" in dropped.stderr, dropped.stderr
    leaked = run_cli(stack.settings, "sql", "SELECT * FROM file('/etc/hostname', 'LineAsString')")
    assert leaked.returncode == 1 and "file()" in leaked.stderr, leaked.stderr
    ok = run_cli(stack.settings, "sql", f"SELECT count() AS n FROM {db}.cost_metrics", "--format", "json")
    assert ok.returncode == 0, ok.stderr


def test_a_dropped_table_is_recreated_by_the_sink_and_ingestion_resumes(
    stack: LocalStack, clickhouse_store: Store
) -> None:
    db = stack.settings.clickhouse.database
    clickhouse_store.command(f"DROP TABLE IF EXISTS {db}.results")
    with SluiceClient(stack.settings) as client:
        ids = [client.submit(f"after the drop {i}", max_tokens=2) for i in range(5)]

    def counts() -> dict[str, int]:
        try:
            return result_counts(clickhouse_store, ids)
        except StoreError:
            return {}  # not re-created yet

    found = wait_until(counts, lambda c: len(c) == len(ids), timeout=90, what="results after the drop")
    assert set(found) == set(ids)
