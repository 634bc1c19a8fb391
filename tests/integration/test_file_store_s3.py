"""Batch files on S3-compatible storage: a real S3 server (SeaweedFS ``weed mini``), boto3's
multipart upload, streamed reads, and a batch whose input and output files live there."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from gateway.batches import BatchService
from gateway.files import FileMeta, S3FileStore, iter_lines
from schemas import BatchState
from sluice.local.storage import ObjectStore
from tests.gateway_doubles import MemoryPublisher, MemoryResults
from tests.support import unavailable

pytestmark = [pytest.mark.s3]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3FileStore]:
    try:
        server = ObjectStore(tmp_path_factory.mktemp("s3")).start()
    except Exception as exc:
        unavailable("SeaweedFS", exc)
    env = server.client_env()
    store = S3FileStore(
        "s3://sluice-files/batches",
        endpoint_url=server.endpoint,
        region="us-east-1",
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    store._s3.create_bucket(Bucket="sluice-files")
    yield store
    server.stop()


def test_a_large_file_round_trips_in_parts(s3: S3FileStore) -> None:
    # Over boto3's 8 MB multipart threshold: the upload goes in parts, the read in chunks.
    lines = [json.dumps({"custom_id": f"c{i}", "pad": "x" * 200}).encode() for i in range(50_000)]
    data = b"\n".join(lines) + b"\n"
    meta = FileMeta(tenant="acme", filename="big.jsonl", purpose="batch", bytes=len(data), lines=len(lines))
    s3.put(meta, io.BytesIO(data))
    got = s3.meta(meta.id)
    assert got is not None and (got.bytes, got.lines, got.tenant) == (len(data), 50_000, "acme")
    count = 0
    for count, line in enumerate(iter_lines(s3.chunks(meta.id)), 1):
        assert line == lines[count - 1]
    assert count == 50_000
    assert [m.id for m in s3.list("acme")] == [meta.id] and s3.list("other") == []
    assert s3.delete(meta.id) and s3.meta(meta.id) is None and not s3.delete(meta.id)


def test_a_batch_reads_its_input_and_writes_its_output_on_s3(s3: S3FileStore, tmp_path: Path) -> None:
    body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
    text = "\n".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i in range(3)
    )
    meta = FileMeta(tenant="acme", filename="in.jsonl", purpose="batch", bytes=len(text), lines=3)
    s3.put(meta, io.BytesIO(text.encode()))
    pub, results = MemoryPublisher(), MemoryResults()
    svc = BatchService(Settings(data_dir=tmp_path), s3, pub, results)
    batch = svc.create("acme", meta.id)
    svc.join(30)
    for request in pub.requests:
        results.answer(request)
    svc.poll_once()
    done = svc.get("acme", batch.batch_id)
    assert done.state is BatchState.COMPLETED and done.output_file_id is not None
    out = [json.loads(x) for x in iter_lines(s3.chunks(done.output_file_id))]
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
