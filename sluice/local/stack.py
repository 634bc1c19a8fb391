"""The local stack: broker, topics, ClickHouse sink and query endpoint in this process, and the
Faust processor and one GPU consumer per catalog model as child processes (as they would be
separate services in production). Used by ``sluice up``, ``sluice demo`` and the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from analytics.query_server import QueryServer
from analytics.sink import ClickHouseSink
from analytics.store import Store
from sluice.catalog import Catalog, load_catalog
from sluice.errors import SluiceError
from sluice.local.broker import EmbeddedBroker
from sluice.settings import Settings
from sluice.stackfile import write_stack_file
from sluice.topics import Topics, ensure_topics

__all__ = ["LocalStack", "child_env"]

logger = logging.getLogger(__name__)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment for a child process: the whole Settings tree, as SLUICE_* JSON values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data = settings.model_dump(mode="json")
    for key, value in data.items():
        if value is None:
            continue
        env[f"SLUICE_{key.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("SLUICE_LOG_LEVEL", os.environ.get("SLUICE_LOG_LEVEL", "INFO"))
    return env


class _Child:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalStack:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        *,
        embedded_broker: bool = True,
        broker_port: int | None = None,
        run_processor: bool = True,
        run_consumers: bool = True,
        run_sink: bool = True,
        store: Store | None = None,
        replicas: int = 1,
    ) -> None:
        self.settings = settings.model_copy(deep=True)
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self.topics = Topics(self.settings.topic_prefix)
        self.embedded_broker = embedded_broker
        self.broker_port = broker_port
        self.run_processor = run_processor
        self.run_consumers = run_consumers
        self.run_sink = run_sink
        # GPU consumers per model, in one consumer group (partitions are shared among them).
        self.replicas = replicas
        self.log_dir = self.settings.data_dir / "logs"
        self.broker: EmbeddedBroker | None = None
        # A caller-owned store is used and left open (one chDB directory per process).
        self.store: Store | None = store
        self._owns_store = store is None
        self.sink: ClickHouseSink | None = None
        self.query_server: QueryServer | None = None
        self.children: list[_Child] = []
        self._stop = threading.Event()
        self._sink_ready = threading.Event()
        self._sink_thread: threading.Thread | None = None

    @property
    def bootstrap_servers(self) -> str:
        return self.settings.kafka.bootstrap_servers

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            self.broker = EmbeddedBroker(self.broker_port, log_path=self.log_dir / "tansu.log").start()
            self.settings.kafka.bootstrap_servers = self.broker.bootstrap_servers
        ensure_topics(
            self.settings.kafka,
            self.topics.pipeline(self.catalog, self.settings.processor.app_id, len(self.settings.retry.backoff_ms)),
        )
        if self.run_sink:
            if self.store is None:
                self.store = Store.from_settings(self.settings)
            self.store.ensure_schema()
            ch = self.settings.clickhouse
            self.query_server = QueryServer(self.store, ch.query_host, ch.query_port).start()
            self.sink = ClickHouseSink(self.settings, self.store)
            self._sink_thread = threading.Thread(
                target=self.sink.run, args=(self._stop, self._sink_ready), name="sink", daemon=True
            )
            self._sink_thread.start()
            self._write_stack_file()
        env = child_env(self.settings)
        py = sys.executable
        if self.run_processor:
            self.children.append(
                _Child(
                    "processor",
                    [py, "-m", "stream_processors"],
                    env,
                    self.log_dir / "processor.log",
                )
            )
        if self.run_consumers:
            for m in self.catalog:
                if not m.available:
                    continue
                for replica in range(self.replicas):
                    name = f"gpu-{m.name}" if self.replicas == 1 else f"gpu-{m.name}-{replica}"
                    self.children.append(
                        _Child(name, [py, "-m", "gpu_consumers", "--model", m.name], env, self.log_dir / f"{name}.log")
                    )

    def _write_stack_file(self) -> None:
        assert self.query_server is not None
        write_stack_file(
            self.settings.data_dir,
            {
                "query_url": self.query_server.url,
                "bootstrap_servers": self.settings.kafka.bootstrap_servers,
                "topic_prefix": self.settings.topic_prefix,
            },
        )

    def check(self) -> None:
        """Raise if a child process died (with the end of its log)."""
        for child in self.children:
            if not child.alive():
                raise SluiceError(
                    f"{child.name} exited with {child.proc.returncode}; "
                    f"last log lines ({child.log_path}):\n{child.tail()}"
                )

    def wait_sink_ready(self, timeout: float = 30.0) -> bool:
        return self._sink_ready.wait(timeout)

    def stop(self) -> None:
        for child in self.children:
            # Consumers drain in-flight requests for up to drain_s on SIGTERM before they leave.
            child.stop(self.settings.engine.drain_s + 15)
        self.children.clear()
        self._stop.set()
        if self._sink_thread is not None:
            self._sink_thread.join(30)
            self._sink_thread = None
        if self.query_server is not None:
            self.query_server.stop()
            self.query_server = None
            (self.settings.data_dir / "stack.json").unlink(missing_ok=True)
        if self.store is not None and self._owns_store:
            self.store.close()
            self.store = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def wait(self) -> None:
        """Block until a child dies or Ctrl-C."""
        while True:
            self.check()
            time.sleep(0.5)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
