"""Opt-in exactly-once results (``SLUICE_KAFKA__TRANSACTIONAL``): the commit path.

Committed transactions carry every result and move the group's offsets: a second consumer that
joined the group after the first one stopped finds nothing left to run. The kill -9 case and abort
visibility are in ``test_apache_kafka.py`` (they need Apache Kafka).
"""

from __future__ import annotations

import signal
import sys
from collections import Counter

import pytest
from confluent_kafka import TopicPartition

from analytics.store import Store
from core import clients
from core.settings import Settings
from producers import SluiceClient
from sluice.local.stack import Child, LocalStack, child_env
from tests.integration.helpers import topic_keys
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def test_transactions_commit_results_with_their_offsets(settings: Settings, clickhouse_store: Store) -> None:
    settings = settings.evolve(kafka={"transactional": True}, engine={"instant_token_seconds": 0.01})
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny"]
    try:
        client = SluiceClient(stack.settings)
        ids = [client.submit(f"exactly once {i}", max_tokens=4, cache=False) for i in range(40)]
        client.flush()
        results_topic = stack.settings.topic_prefix + "results"
        child = Child("gpu-tiny", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny.log")

        def answered(quiet_s: float = 0.5) -> Counter[str]:
            wanted = set(ids)
            return Counter(k for k in topic_keys(stack.settings, [results_topic], quiet_s=quiet_s) if k in wanted)

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
        second = Child("gpu-tiny-2", cmd, child_env(stack.settings), stack.log_dir / "gpu-tiny-2.log")
        admin = clients.admin(stack.settings.kafka, "test")
        try:
            # Not vacuous: the second consumer is a member of the group holding every partition...
            def members() -> int:
                (desc,) = admin.describe_consumer_groups([group]).values()
                return sum(len(m.assignment.topic_partitions) for m in desc.result(10).members)

            wait_until(members, lambda n: n == len(tps), timeout=60, what="the second consumer's assignment")
            # ...and has consumed past the committed offsets: a request published now is answered
            # by it, behind anything of the first run that it would have run again.
            marker = client.submit("exactly once: the marker", max_tokens=4, cache=False)
            client.flush()
            ids.append(marker)
            wait_until(answered, lambda c: marker in c, timeout=60, what="the marker's result")
        finally:
            second.stop()
        # Counted after a quiet period on the topic (read_committed): each once.
        assert answered(quiet_s=5.0) == Counter({rid: 1 for rid in ids})
    finally:
        stack.stop()
