"""A GPU consumer killed with SIGKILL mid-batch and restarted: every request still has exactly
one result row (offsets move only after results are acknowledged; the sink dedupes by id)."""

from __future__ import annotations

import signal
import sys

import pytest

from analytics.store import Store
from producers import SluiceClient
from sluice.local.stack import LocalStack, _Child, child_env
from sluice.settings import Settings
from tests.integration.helpers import result_counts
from tests.support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def test_sigkill_mid_batch_then_restart_yields_each_result_once(settings: Settings, clickhouse_store: Store) -> None:
    # Slow batches so the kill lands while a batch is in the engine.
    settings.engine.instant_token_seconds = 0.1
    settings.engine.max_inflight = 4
    stack = LocalStack(settings, store=clickhouse_store, run_consumers=False).start()
    env = child_env(stack.settings)
    cmd = [sys.executable, "-m", "gpu_consumers", "--model", "tiny"]
    log = stack.log_dir / "gpu-tiny.log"
    try:
        client = SluiceClient(stack.settings)
        ids = [client.submit(f"crash test {i}", priority="normal", max_tokens=4) for i in range(60)]
        client.flush()
        kills = 0
        for _ in range(3):
            child = _Child("gpu-tiny", cmd, env, log)
            # Let it join the group and get some batches done, then kill it mid-batch.
            wait_until(
                lambda: len(result_counts(clickhouse_store, ids)),
                lambda n, k=kills: n >= 12 * (k + 1) or n == len(ids),
                timeout=120,
                interval=0.1,
                what="progress before the kill",
            )
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
            child.stop()
            kills += 1
        child = _Child("gpu-tiny", cmd, env, log)
        try:
            counts = wait_until(
                lambda: result_counts(clickhouse_store, ids),
                lambda c: len(c) == len(ids),
                timeout=180,
                what="every result after restarts",
            )
        finally:
            child.stop()
        assert kills == 3
        assert counts == {rid: 1 for rid in ids}
    finally:
        stack.stop()
