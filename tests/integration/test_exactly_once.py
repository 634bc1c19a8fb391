"""Opt-in exactly-once results (``SLUICE_KAFKA__TRANSACTIONAL``): the commit path.

The embedded broker commits transactions (records and source offsets together) but cannot hide
aborted ones from ``read_committed`` readers, so what is tested here is that committed
transactions carry every result and move the group's offsets: a second consumer started after
the first one stopped finds nothing left to run. Abort visibility needs Apache Kafka (see README).
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import TopicPartition

from analytics.store import Store
from producers import SluiceClient
from sluice import clients
from sluice.local.stack import LocalStack, _Child, child_env
from sluice.settings import Settings
from tests.integration.helpers import topic_keys
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def test_transactions_commit_results_with_their_offsets(settings: Settings, clickhouse_store: Store) -> None:
    settings.kafka.transactional = True
    settings.engine.instant_token_seconds = 0.01
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny"]
    try:
        client = SluiceClient(stack.settings)
        ids = [client.submit(f"exactly once {i}", max_tokens=4, cache=False) for i in range(40)]
        client.flush()
        results_topic = stack.settings.topic_prefix + "results"
        child = _Child("gpu-tiny", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny.log")

        def answered() -> Counter[str]:
            wanted = set(ids)
            return Counter(k for k in topic_keys(stack.settings, [results_topic], quiet_s=0.5) if k in wanted)

        wait_until(answered, lambda c: len(c) == len(ids), timeout=120, what="every result, committed")
        child.proc.send_signal(signal.SIGTERM)
        child.proc.wait(30)
        child.stop()
        assert child.proc.returncode == 0, child.tail()
        # The offsets went with the results: the group has nothing left on the model topics.
        group = f"{stack.settings.topic_prefix}gpu-tiny"
        probe = clients.consumer(stack.settings.kafka, "test", group)
        try:
            meta = probe.list_topics(timeout=10).topics
            tps = [TopicPartition(t, p) for t in stack.topics.model_topics("tiny") for p in meta[t].partitions]
            committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=10)}
        finally:
            probe.close()
        assert sum(max(0, o) for o in committed.values()) == len(ids)
        second = _Child("gpu-tiny-2", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny-2.log")
        try:
            time.sleep(8)  # long enough to join the group and fetch anything uncommitted
        finally:
            second.stop()
        assert answered() == Counter({rid: 1 for rid in ids})
    finally:
        stack.stop()
