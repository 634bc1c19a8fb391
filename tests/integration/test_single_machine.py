"""``sluice up`` as a small team runs it: a real ``sluice up`` process, through its public
interfaces only (its broker, its query endpoint, signals). Durable by default; supervised;
stopped cleanly by SIGTERM or a terminal's Ctrl-C.

Counting is what a subscriber sees: result messages per request id on the results topic, and raw
ClickHouse rows without ``FINAL`` beside the deduplicated count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from core import clients
from core.catalog import Catalog, write_catalog
from core.errors import SluiceError
from core.settings import Settings
from producers import SluiceClient
from sluice.local.kafka import java_binary, kafka_libs
from sluice.local.process import pid_alive
from tests.integration.helpers import topic_keys
from tests.support import model_entry, run_cli, unavailable, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


class Up:
    """One ``sluice up`` process on a data directory."""

    def __init__(self, data_dir: Path, *args: str, token_seconds: float = 0.01, broker: str = "tansu") -> None:
        self.data_dir = data_dir
        # This tier covers the embedded default (tansu); Apache Kafka where a test names it.
        self.broker = broker
        self.args = (*args, "--broker", broker)
        data_dir.mkdir(parents=True, exist_ok=True)
        catalog = write_catalog(Catalog(models=[model_entry("tiny")]), data_dir / "catalog.toml")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
            "SLUICE_DATA_DIR": str(data_dir),
            "SLUICE_CATALOG_PATH": str(catalog),
            "SLUICE_TOPIC_PREFIX": "up.",
            "SLUICE_ENGINE__INSTANT_TOKEN_SECONDS": str(token_seconds),
            "SLUICE_ENGINE__MAX_INFLIGHT": "8",
            "SLUICE_ENGINE__DRAIN_S": "3",
            "SLUICE_CLICKHOUSE__SINK_FLUSH_MS": "200",
            "SLUICE_LOG_LEVEL": "INFO",
        }
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 90.0) -> Up:
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "--log-level", "INFO", "up", "--engine", "instant", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group, like a shell job: a group SIGINT is what Ctrl-C sends.
            start_new_session=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        # Read everything it prints, all the time: a full pipe would block it.
        self._reader = threading.Thread(target=lambda: self.output.extend(stdout), daemon=True)
        self._reader.start()
        try:
            wait_until(
                lambda: any("Sluice is up" in line for line in self.output),
                timeout=timeout,
                what="the ready line",
            )
            # broker (+ tansu's storage), router, consumer (+ gateway)
            expected = 3 if "--ephemeral" in self.args or self.broker == "kafka" else 4
            wait_until(self.children, lambda c: len(c) >= expected, timeout=30, what="broker, storage and children")
        except BaseException:
            self.close()  # never leave a half-started stack behind
            raise
        return self

    def settings(self) -> Settings:
        # No broker address given: found in the running stack's stack.json, as the CLI and SDK do.
        s = Settings(data_dir=self.data_dir, topic_prefix="up.")
        assert "bootstrap_servers" not in s.kafka.model_fields_set
        return s

    def children(self) -> dict[int, str]:
        """Processes whose parent is this ``sluice up`` (pid -> command)."""
        assert self.proc is not None
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out[int(stat.parent.name)] = cmdline
        return out

    def sql(self, query: str, **params: Any) -> list[list[Any]]:
        info = json.loads((self.data_dir / "stack.json").read_text())
        body = json.dumps({"sql": query, "parameters": params}).encode()
        token = (self.data_dir / "query.token").read_text()
        req = urllib.request.Request(
            f"{info['query_url']}/query",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            rows: list[list[Any]] = json.loads(resp.read())["rows"]
        return rows

    def stop(self, sig: int = signal.SIGTERM, *, group: bool = False, timeout: float = 60) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)
        elapsed = time.monotonic() - t0
        if self._reader is not None:
            self._reader.join(10)
        return elapsed

    def kill_everything(self) -> list[int]:
        pids = [*self.children(), self.proc.pid if self.proc else 0]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)
        return pids

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_everything()


def _alive(pid: int) -> bool:
    return pid_alive(pid)


def _results_on_topic(settings: Settings, ids: list[str]) -> Counter[str]:
    wanted = set(ids)
    return Counter(k for k in topic_keys(settings, [settings.topic_prefix + "results"]) if k in wanted)


def _routed_again(settings: Settings, ids: list[str]) -> int:
    """Second copies of these requests on the model topics: the router routes again what it handled
    after its last offset commit (at least once), and the consumer may run such a copy again."""
    topics = clients.admin(settings.kafka, "test").list_topics(timeout=10).topics
    model_topics = [t for t in topics if t.startswith(settings.topic_prefix + "model.")]
    wanted = set(ids)
    copies = Counter(k for k in topic_keys(settings, model_topics) if k in wanted)
    return sum(n - 1 for n in copies.values())


def _submit(up: Up, n: int, tag: str, **kw: Any) -> list[str]:
    client = SluiceClient(up.settings())
    ids = [client.submit(f"{tag} {i}", cache=False, max_tokens=8, **kw) for i in range(n)]
    client.flush()  # acknowledged: from here on, none of these may be lost
    return ids


BROKERS = pytest.mark.parametrize("broker", ["tansu", "kafka"])


def _needs(broker: str) -> None:
    if broker == "kafka":
        try:
            java_binary()
            kafka_libs()
        except SluiceError as exc:
            unavailable("Apache Kafka", exc)


@BROKERS
def test_kill_9_of_every_process_then_a_restart_loses_nothing(tmp_path: Path, broker: str) -> None:
    _needs(broker)
    up = Up(tmp_path / "data", broker=broker).start()
    try:
        ids = _submit(up, 300, "kill-all")
        killed = up.kill_everything()
        # SIGKILL is asynchronous: a JVM with many threads and a large heap takes a moment to go.
        wait_until(lambda: [p for p in killed if _alive(p)], lambda alive: not alive, timeout=15, what="every kill")
        t0 = time.monotonic()
        up.start()
        settings = up.settings()
        on_topic = wait_until(
            lambda: _results_on_topic(settings, ids),
            lambda c: len(c) == len(ids),
            timeout=180,
            what="a result for every acknowledged request after the restart",
        )
        rows = wait_until(
            lambda: up.sql(
                "SELECT request_id, count() FROM sluice.results WHERE request_id IN {ids:Array(String)} "
                "GROUP BY request_id",
                ids=ids,
            ),
            lambda r: len(r) == len(ids),
            timeout=60,
        )
        recovered_s = time.monotonic() - t0
        once = up.sql("SELECT count() FROM sluice.results FINAL WHERE request_id IN {ids:Array(String)}", ids=ids)[0][0]
        duplicates = sum(n - 1 for n in on_topic.values())
        raw = sum(int(r[1]) for r in rows)
        print(
            f"kill -9 of everything ({broker}): {len(ids)} acknowledged, {len(on_topic)} answered "
            f"{recovered_s:.1f}s after the restart, {duplicates} duplicate result message(s), raw rows {raw}"
        )
        assert once == len(ids)
        assert set(on_topic) == set(ids)
        # Every duplicate result is explained: the in-flight window of the one consumer
        # (max_inflight 8), or a second copy the router routed (what it handled after its last
        # offset commit; the faster the router, the more it has handled when everything dies).
        routed_again = _routed_again(settings, ids)
        print(f"routed again: {routed_again}")
        assert duplicates <= 2 * 8 + routed_again
        assert len(ids) <= raw <= len(ids) + duplicates  # every result message became one row
    finally:
        up.close()


def test_a_killed_consumer_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    up = Up(tmp_path / "data", token_seconds=0.02).start()
    try:
        # The gateway is part of the stack: its URL is on the ready line and in the stack file.
        gateway_url = json.loads((up.data_dir / "stack.json").read_text())["gateway_url"]
        assert gateway_url in "".join(up.output)
        with urllib.request.urlopen(f"{gateway_url}/healthz", timeout=5) as resp:
            assert resp.status == 200
        ids = _submit(up, 150, "consumer-dies")
        consumer = next(p for p, cmd in up.children().items() if "gpu_consumers" in cmd)
        time.sleep(1.0)
        os.kill(consumer, signal.SIGKILL)
        wait_until(
            lambda: [p for p, cmd in up.children().items() if "gpu_consumers" in cmd and p != consumer],
            timeout=30,
            what="a new consumer process",
        )
        on_topic = wait_until(lambda: _results_on_topic(up.settings(), ids), lambda c: len(c) == len(ids), timeout=120)
        assert set(on_topic) == set(ids)
        assert up.proc is not None and up.proc.poll() is None  # the stack kept serving
    finally:
        up.stop()
    assert "gpu-tiny exited" in "".join(up.output) and "gpu-tiny restarted" in "".join(up.output)


@BROKERS
def test_a_graceful_stop_keeps_the_backlog_and_the_cache(tmp_path: Path, broker: str) -> None:
    _needs(broker)
    up = Up(tmp_path / "data", token_seconds=0.05, broker=broker).start()
    try:
        client = SluiceClient(up.settings())
        first = client.submit("What is the capital of France?", tenant="cache", max_tokens=4)
        client.flush()
        wait_until(lambda: _results_on_topic(up.settings(), [first]), timeout=60, what="the first answer")

        def answer(rid: str) -> list[list[Any]]:
            return up.sql(
                "SELECT cached, deduplicated_from FROM sluice.results FINAL WHERE request_id = {r:String}", r=rid
            )

        # The cache holds the answer before the stop (so the table's changelog has it).
        before = client.submit("What is the capital of France?", tenant="cache", max_tokens=4)
        client.flush()
        assert wait_until(lambda: answer(before), timeout=60, what="a cache hit") == [[True, first]]
        backlog = _submit(up, 400, "backlog", priority="low")
        time.sleep(1.0)
        stopped_in = up.stop(signal.SIGTERM)
        assert up.proc is not None and up.proc.returncode == 0, "".join(up.output[-20:])
        assert stopped_in < 3 + 20, stopped_in
        up.start()
        on_topic = wait_until(
            lambda: _results_on_topic(up.settings(), backlog),
            lambda c: len(c) == len(backlog),
            timeout=180,
            what="the whole backlog after the restart",
        )
        assert set(on_topic) == set(backlog)
        client = SluiceClient(up.settings())
        repeat = client.submit("What is the capital of France?", tenant="cache", max_tokens=4)
        client.flush()
        (row,) = wait_until(lambda: answer(repeat), timeout=60, what="the repeat's answer")
        if broker == "kafka":
            # Apache Kafka: the router's table recovers whole and the repeat is a cache hit.
            assert row == [True, first], row
        else:
            # tansu reports a short high watermark for multi-record batches, so its recovered
            # table can miss the entry's last state: then the repeat runs again. It must never
            # wait on a stale entry (which would leave it unanswered for INFLIGHT_TTL_S).
            assert row in ([True, first], [False, None]), row
    finally:
        up.stop()


def test_dead_letters_from_two_broker_lifetimes_keep_distinct_ids_and_both_replay(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dead: list[str] = []
    for lifetime in range(2):
        # In memory: the second broker numbers offsets from 0 again.
        up = Up(data, "--ephemeral").start()
        try:
            client = SluiceClient(up.settings())
            rid = client.submit(f"lifetime {lifetime}", model="retired-model", max_tokens=4)
            client.flush()
            rows = wait_until(
                lambda rid=rid, up=up: up.sql(
                    "SELECT dead_letter_id, source_partition, source_offset FROM sluice.dead_letters FINAL "
                    "WHERE request_id = {r:String}",
                    r=rid,
                ),
                timeout=60,
                what="the dead letter",
            )
            dead.append(rows[0][0])
            if lifetime == 1:
                listed = up.sql("SELECT dead_letter_id FROM sluice.dead_letters FINAL WHERE reason = 'unknown_model'")
                assert sorted(r[0] for r in listed) == sorted(dead)
                settings = up.settings()
                settings = settings.evolve(catalog_path=data / "catalog.toml")
                out = run_cli(
                    settings, "dlq", "replay", "--reason", "unknown_model", "--to-model", "tiny", "--format", "json"
                )
                assert out.returncode == 0, out.stderr
                actions = [json.loads(line)["action"] for line in out.stdout.splitlines() if line.startswith("{")]
                assert actions == ["replayed", "replayed"]
        finally:
            up.stop()
    assert len(set(dead)) == 2


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"])
def test_stopping_leaves_no_process_and_no_error_flood(tmp_path: Path, sig: int, group: bool) -> None:
    up = Up(tmp_path / "data", token_seconds=0.05).start()
    children = list(up.children())
    _submit(up, 100, "stop")
    time.sleep(1.0)
    stopped_in = up.stop(sig, group=group)
    assert up.proc is not None and up.proc.returncode in (0, 130), "".join(up.output[-20:])
    assert stopped_in < 3 + 20, stopped_in  # the consumers' drain grace plus a few seconds
    assert not [p for p in children if _alive(p)]
    logs = "".join(up.output) + "".join(
        p.read_text(errors="replace") for p in (tmp_path / "data" / "logs").glob("*.log")
    )
    connection_errors = [line for line in logs.splitlines() if "Connection refused" in line or "|FAIL|" in line]
    assert len(connection_errors) <= 5, connection_errors[:10]


def _descendants(root: int) -> set[int]:
    """Every process below ``root`` (children, grandchildren: the broker's own threads excluded)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def test_kill_9_of_sluice_up_alone_leaves_nothing_running_and_it_starts_again(tmp_path: Path) -> None:
    up = Up(tmp_path / "data").start()
    try:
        stack = {int(p) for p in (up.data_dir / "pids").glob("*.pid") for p in [p.read_text().split()[0]]}
        below = _descendants(up.proc.pid if up.proc else 0)
        assert len(below) >= 4  # tansu, SeaweedFS, router, consumer, gateway
        assert up.proc is not None
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)
        # Every child, the broker and storage binaries included, dies with its parent.
        wait_until(lambda: [p for p in below | stack if _alive(p)], lambda left: not left, timeout=20, what="no orphan")
        up.start()
        ids = _submit(up, 5, "after-parent-crash")
        answered = wait_until(lambda: _results_on_topic(up.settings(), ids), lambda c: len(c) == 5, timeout=60)
        assert set(answered) == set(ids)
    finally:
        up.close()


def test_a_crashed_runs_leftovers_are_stopped_and_a_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "pids").mkdir(parents=True)
    # What a crashed run leaves where the kernel could not stop it: a live process named in a pid
    # file (here a stand-in holding nothing), and a pid file whose process is long gone.
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (data / "pids" / "storage.pid").write_text(f"{leftover.pid}\nsleep\n")
    (data / "pids" / "tansu.pid").write_text("999999\ntansu\n")
    try:
        up = Up(data).start()
        try:
            assert leftover.wait(20) is not None  # stopped by the new run
            assert "left running by an earlier stack" in "".join(up.output)
            ids = _submit(up, 3, "after-cleanup")
            wait_until(lambda: _results_on_topic(up.settings(), ids), lambda c: len(c) == 3, timeout=60)
        finally:
            up.stop()
    finally:
        if leftover.poll() is None:
            leftover.kill()


def test_two_stacks_run_side_by_side_and_a_second_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    one = Up(tmp_path / "one").start()
    try:
        two = Up(tmp_path / "two").start()
        try:
            ports = {json.loads((u.data_dir / "stack.json").read_text())["bootstrap_servers"] for u in (one, two)}
            assert len(ports) == 2  # each broker on a free port of its own, none on 9092 by default
            for u in (one, two):
                ids = _submit(u, 3, f"side-{u.data_dir.name}")
                wait_until(lambda u=u, ids=ids: _results_on_topic(u.settings(), ids), lambda c: len(c) == 3, timeout=60)
        finally:
            two.stop()
        again = subprocess.run(
            [sys.executable, "-m", "sluice", "up", "--engine", "instant", "--broker", "tansu"],
            env=one.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode != 0
        assert "another Sluice stack (pid" in again.stdout + again.stderr
    finally:
        one.stop()


def test_everything_stack_json_lists_answers_the_moment_it_appears(tmp_path: Path) -> None:
    up = Up(tmp_path / "data")
    path = up.data_dir / "stack.json"
    checked: list[dict[str, Any]] = []

    def answers(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code  # an answer (a consumer loading its engine says 503)

    def watch() -> None:
        # Read each version of the file the moment it appears and call what it lists at once.
        seen = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                text = path.read_text()
            except FileNotFoundError:
                time.sleep(0.002)
                continue
            if text != seen:
                seen = text
                info = json.loads(text)
                calls = {"query": answers(f"{info['query_url']}/health")}
                if "gateway_url" in info:
                    calls["gateway"] = answers(f"{info['gateway_url']}/healthz")
                for name, url in info.get("metrics_urls", {}).items():
                    calls[name] = answers(url.replace("/metrics", "/healthz"))
                checked.append({"ready": info["ready"], **calls})
                if info["ready"]:
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        up.start()
        watcher.join(60)
        assert checked and checked[-1]["ready"] is True and checked[-1]["gateway"] == 200
        assert all(v != 0 for c in checked for v in c.values() if not isinstance(v, bool))
        assert all(c["query"] == 200 for c in checked)
        # Listed as soon as it answers (the batch CLI finds it there before every child's metrics
        # endpoint is up), and never before.
        assert all(c["gateway"] == 200 for c in checked if "gateway" in c)
    finally:
        up.close()
