"""Guarantees that need Apache Kafka (they cannot be shown on tansu): aborted transactions stay
invisible to ``read_committed`` readers, the transactional GPU consumer killed mid-traffic gives no
duplicate and loses nothing, the router's table recovers whole after kill -9, and Kafka's own
tools read what Sluice wrote as independent peers. Counted as a subscriber sees it: messages per
request id on the topics, read until nothing new arrives for a quiet period."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from analytics.store import Store
from core import clients
from core.settings import Settings
from core.topics import ensure_topics
from producers import SluiceClient
from sluice.local.kafka import KafkaCluster, kafka_tool
from sluice.local.stack import Child, LocalStack, child_env
from tests.integration.helpers import topic_keys
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "avro"


@pytest.fixture(autouse=True)
def _apache_kafka(kafka_cluster: KafkaCluster) -> KafkaCluster:
    return kafka_cluster


def _keys(settings: Settings, topic: str, *, isolation: str, quiet_s: float = 3.0) -> Counter[str]:
    consumer = clients.consumer(
        settings.kafka, "test", f"{settings.topic_prefix}probe-{uuid.uuid4().hex[:6]}", **{"isolation.level": isolation}
    )
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta[topic].partitions])
    seen: Counter[str] = Counter()
    last_new = time.monotonic()
    try:
        while time.monotonic() - last_new < quiet_s:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    seen[(msg.key() or b"").decode()] += 1
                    last_new = time.monotonic()
    finally:
        consumer.close()
    return seen


def test_aborted_transactions_are_invisible_to_read_committed_readers(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}txn"
    ensure_topics(settings.kafka, {topic: {}})
    producer = clients.producer(settings.kafka, "test", **{"transactional.id": f"{topic}-tx"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=f"aborted-{i}", value=b"x")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=f"committed-{i}", value=b"y")
    producer.commit_transaction(30)
    committed = _keys(settings, topic, isolation="read_committed", quiet_s=1.5)
    uncommitted = _keys(settings, topic, isolation="read_uncommitted", quiet_s=1.5)
    assert committed == Counter({f"committed-{i}": 1 for i in range(3)})
    # The aborted records are in the log (a read_uncommitted reader sees them), just not visible.
    assert {k for k in uncommitted if k.startswith("aborted-")} == {f"aborted-{i}" for i in range(5)}


def test_watermarks_and_latest_offset_reset_are_exact(settings: Settings) -> None:
    """What tansu gets wrong (its high watermark is the last batch's base offset + 1): on Apache
    Kafka the high watermark counts every record, and a new group with auto.offset.reset=latest
    starts at the end and sees exactly what is produced after it joined."""
    topic = f"{settings.topic_prefix}marks"
    ensure_topics(settings.kafka, {topic: {}})
    producer = clients.producer(settings.kafka, "test")
    for i in range(30):
        producer.produce(topic, key=f"before-{i}", value=b"x", partition=i % 3)
    assert producer.flush(10) == 0
    probe = clients.consumer(settings.kafka, "test", f"{topic}-probe")
    try:
        marks = [probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in range(3)]
    finally:
        probe.close()
    assert marks == [(0, 10), (0, 10), (0, 10)]
    latest = clients.consumer(settings.kafka, "test", f"{topic}-latest", **{"auto.offset.reset": "latest"})
    try:
        latest.subscribe([topic])
        seen: list[str] = []

        def poll_some() -> list[str]:
            msg = latest.poll(0.2)
            if msg is not None and msg.error() is None:
                seen.append((msg.key() or b"").decode())
            return seen

        # A sentinel on every partition until the reader sees one: it is then positioned.
        def sentinel() -> list[str]:
            for p in range(3):
                producer.produce(topic, key="sentinel", value=b"s", partition=p)
            producer.flush(10)
            return [k for k in poll_some() if k == "sentinel"]

        wait_until(sentinel, timeout=60, what="the reader to start at the end")
        for i in range(6):
            producer.produce(topic, key=f"after-{i}", value=b"y", partition=i % 3)
        assert producer.flush(10) == 0
        wait_until(poll_some, lambda keys: sum(k.startswith("after-") for k in keys) == 6, timeout=30)
        assert not [k for k in seen if k.startswith("before-")]  # nothing from before it joined
    finally:
        latest.close()


def test_transactional_consumer_killed_mid_traffic_gives_no_duplicate_and_loses_nothing(
    settings: Settings, clickhouse_store: Store
) -> None:
    settings = settings.evolve(kafka={"transactional": True}, engine={"instant_token_seconds": 0.02})
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny"]
    results_topic = stack.topics.results
    try:
        with SluiceClient(stack.settings) as client:
            ids = [client.submit(f"exactly once under kill {i}", max_tokens=6, cache=False) for i in range(150)]
        wanted = set(ids)
        first = Child("gpu-tiny", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny.log")
        try:
            wait_until(
                lambda: len(wanted & set(topic_keys(stack.settings, [results_topic], quiet_s=0.3))),
                lambda n: n >= 30,
                timeout=120,
                what="a first part of the results",
            )
            first.signal(signal.SIGKILL)
            first.popen.wait(10)
        finally:
            first.stop()
        second = Child("gpu-tiny-2", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny-2.log")
        try:
            wait_until(
                lambda: wanted <= set(topic_keys(stack.settings, [results_topic], quiet_s=0.3)),
                timeout=180,
                what="every result after the kill",
            )
            # A quiet period long enough for a late duplicate: the consumer's commit interval many times.
            committed = _keys(stack.settings, results_topic, isolation="read_committed", quiet_s=5.0)
        finally:
            second.stop()
        counts = {rid: committed[rid] for rid in ids}
        assert [rid for rid, n in counts.items() if n == 0] == []  # nothing lost
        assert {rid: n for rid, n in counts.items() if n > 1} == {}  # no duplicate
        everything = _keys(stack.settings, results_topic, isolation="read_uncommitted", quiet_s=1.0)
        assert sum(everything[rid] for rid in ids) >= len(ids)
    finally:
        stack.stop()


def _answer(store: Store, rid: str) -> list[list[Any]]:
    return store.query(
        "SELECT cached, deduplicated_from FROM sluice.results FINAL WHERE request_id = {r:String}", {"r": rid}
    ).rows


def test_the_routers_table_recovers_whole_after_kill_9(settings: Settings, clickhouse_store: Store) -> None:
    stack = LocalStack(settings, store=clickhouse_store).start()
    try:
        with SluiceClient(stack.settings) as client:
            first = client.submit("What is the capital of France?", tenant="recovery", max_tokens=4)
        wait_until(lambda: _answer(clickhouse_store, first), timeout=60, what="the first answer")
        with SluiceClient(stack.settings) as client:
            before = client.submit("What is the capital of France?", tenant="recovery", max_tokens=4)
        assert wait_until(lambda: _answer(clickhouse_store, before), timeout=60) == [[True, first]]
        router = next(c for c in stack.children if c.name == "processor")
        old_pid = router.pid
        router.signal(signal.SIGKILL)
        wait_until(lambda: router.alive() and router.pid != old_pid, timeout=60, what="the router restarted")
        with SluiceClient(stack.settings) as client:
            repeat = client.submit("What is the capital of France?", tenant="recovery", max_tokens=4)
        # Strict on Apache Kafka: the table is recovered from its changelog up to the high
        # watermark, so the repeat is answered from the cache, never run again. (This test found
        # a Faust seek defect that stalled a partition after the restart: stream_processors/transport.py.)
        got = wait_until(lambda: _answer(clickhouse_store, repeat), timeout=120, what="the repeat")
        assert got == [[True, first]]
    finally:
        stack.stop()


_SEP = "\x1e--sluice-record--\x1e"


def test_kafkas_own_tools_read_the_results_and_the_groups_offsets(settings: Settings, clickhouse_store: Store) -> None:
    # A consumer group's committed offsets (share groups have none; kafka-share-groups shows
    # those in test_share_groups.py).
    settings = settings.evolve(consumer={"group": "classic"})
    stack = LocalStack(settings, store=clickhouse_store).start()
    try:
        with SluiceClient(stack.settings) as client:
            ids = [client.submit(f"tools {i}", model="tiny", max_tokens=4, cache=False) for i in range(12)]
        wait_until(
            lambda: set(ids) <= set(topic_keys(stack.settings, [stack.topics.results], quiet_s=0.3)),
            timeout=120,
            what="every result",
        )
        servers = stack.settings.kafka.bootstrap_servers
        out = subprocess.run(
            kafka_tool(
                "kafka-console-consumer",
                "--bootstrap-server",
                servers,
                "--topic",
                stack.topics.results,
                "--from-beginning",
                "--max-messages",
                str(len(ids)),
                "--timeout-ms",
                "30000",
                "--formatter-property",
                "print.key=true",
                "--formatter-property",
                f"key.separator={_SEP}",
                "--formatter-property",
                f"line.separator={_SEP}",
            ),
            capture_output=True,
            timeout=90,
        )
        assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
        parts = out.stdout.split(_SEP.encode())
        pairs = list(zip(parts[0::2], parts[1::2], strict=False))
        schema = fastavro.parse_schema(json.loads((SCHEMAS / "inference_result.v1.avsc").read_text()))
        decoded = {}
        for key, value in pairs:
            assert value[0] == 0, "Confluent wire format: magic byte 0, then a 4-byte schema id"
            record = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, schema)
            decoded[key.decode()] = record
        assert set(decoded) == set(ids)
        assert all(r["request_id"] == k and r["status"] == "succeeded" for k, r in decoded.items())

        # The GPU consumer group's committed offsets reach the end of every model topic.
        group = f"{stack.settings.topic_prefix}gpu-tiny"

        def describe() -> list[list[str]]:
            proc = subprocess.run(
                kafka_tool("kafka-consumer-groups", "--bootstrap-server", servers, "--describe", "--group", group),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            return [line.split() for line in proc.stdout.splitlines() if line.startswith(group)]

        rows = wait_until(
            describe,
            # An empty partition has no committed offset ("-") at log end 0.
            lambda rs: bool(rs) and all(r[5] == "0" or (r[3] == "-" and r[4] == "0") for r in rs),
            timeout=60,
            what="zero lag on every model partition",
        )
        topics = set(stack.topics.model_topics("tiny"))
        # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
        assert {r[1] for r in rows} <= topics
        assert all(r[3] == r[4] for r in rows if r[4] != "0")
        assert sum(int(r[3]) for r in rows if r[3] != "-") == len(ids)
    finally:
        stack.stop()
