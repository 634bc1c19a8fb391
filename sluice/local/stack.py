"""The local stack: broker (and, durable, its object storage), topics, ClickHouse sink and query
endpoint in this process, and the Faust processor and the GPU consumers of each catalog model as
supervised child processes (as they would be separate services in production). Used by
``sluice up``, ``sluice demo`` and the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from analytics.query_server import QueryServer, token_path
from analytics.sink import ClickHouseSink
from analytics.store import Store
from gateway.keys import KeyStore, keys_path
from sluice.catalog import Catalog, load_catalog
from sluice.errors import SluiceError
from sluice.lifecycle import PARENT_PID_ENV
from sluice.local.broker import EmbeddedBroker, stop_process
from sluice.local.storage import ObjectStore
from sluice.metrics import CHILD_RESTARTS, MetricsServer
from sluice.settings import Settings
from sluice.stackfile import write_stack_file
from sluice.topics import Topics, ensure_topics

__all__ = ["LocalStack", "child_env", "ensure_operator_key", "free_port", "operator_key_path"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def operator_key_path(settings: Settings) -> Path:
    return settings.data_dir / "gateway.key"


def ensure_operator_key(settings: Settings) -> str:
    """An API key for the ``default`` tenant, kept (mode 0600) beside the stack file: the CLI's
    ``sluice batch`` commands use it when ``SLUICE_API_KEY`` is not set."""
    path = operator_key_path(settings)
    if path.exists():
        return path.read_text().strip()
    key = KeyStore(keys_path(settings)).create("default", name="operator (sluice up)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


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
    """A supervised child process: its own session (a terminal's Ctrl-C reaches only the stack,
    which stops children in order), its log appended across restarts."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log
        self.failures: list[float] = []
        self.restart_at: float | None = None
        self.restarts = 0
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] | None = None
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._log is None:
            self._log = self.log_path.open("ab")
        return subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def respawn(self) -> None:
        self.proc = self._spawn()
        self.restart_at = None
        self.restarts += 1

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, timeout, self.name)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalStack:
    """Broker, storage, ClickHouse sink and query endpoint, the router and the GPU consumers.

    ``durable=True`` (what ``sluice up`` runs) keeps the broker's log in a local S3-compatible
    store under the data directory, so acknowledged requests, committed offsets and the router's
    tables survive kill -9 of every process. Children are supervised: one that dies is restarted
    with exponential backoff; one that dies ``max_restarts`` times within ``restart_window_s``
    stops the stack with its name and last log lines. :meth:`stop` stops in dependency order:
    consumers drain and commit, then the router, the sink flushes, then the broker and storage.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        *,
        embedded_broker: bool | None = None,
        broker_port: int | None = None,
        run_processor: bool = True,
        run_consumers: bool = True,
        run_sink: bool = True,
        store: Store | None = None,
        replicas: int = 1,
        durable: bool = False,
        supervise: bool = True,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        run_gateway: bool = False,
    ) -> None:
        self.settings = settings.model_copy(deep=True)
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self.topics = Topics(self.settings.topic_prefix)
        # Unset: start tansu only when the settings name no broker (SLUICE_KAFKA__BOOTSTRAP_SERVERS
        # or an assignment); a configured address, Apache Kafka's say, is used as it is.
        self.embedded_broker = (
            embedded_broker
            if embedded_broker is not None
            else "bootstrap_servers" not in settings.kafka.model_fields_set
        )
        self.broker_port = broker_port
        self.run_processor = run_processor
        self.run_consumers = run_consumers
        self.run_sink = run_sink
        # GPU consumers per model, in one consumer group (partitions are shared among them).
        self.replicas = replicas
        self.run_gateway = run_gateway
        self.gateway_url: str | None = None
        self.durable = durable
        self.supervise = supervise
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.log_dir = self.settings.data_dir / "logs"
        self.object_store: ObjectStore | None = None
        self.broker: EmbeddedBroker | None = None
        # A caller-owned store is used and left open (one chDB directory per process).
        self.store: Store | None = store
        self._owns_store = store is None
        self.sink: ClickHouseSink | None = None
        self.query_server: QueryServer | None = None
        self.metrics_server: MetricsServer | None = None
        # Component name -> its Prometheus endpoint (this process serves the sink's).
        self.metrics_urls: dict[str, str] = {}
        self.children: list[_Child] = []
        self._stop = threading.Event()
        self._sink_ready = threading.Event()
        self._sink_thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._failure: str | None = None

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
            storage_env = None
            if self.durable:
                self.object_store = ObjectStore(self.settings.data_dir / "broker", self.log_dir / "storage.log").start()
                storage_env = self.object_store.client_env()
            self.broker = EmbeddedBroker(
                self.broker_port, log_path=self.log_dir / "tansu.log", storage_env=storage_env
            ).start()
            self.settings.kafka.bootstrap_servers = self.broker.bootstrap_servers
        ensure_topics(
            self.settings.kafka,
            self.topics.pipeline(
                self.catalog,
                self.settings.processor.app_id,
                len(self.settings.retry.backoff_ms),
                self.settings.tenants,
            ),
        )
        if self.run_sink:
            if self.store is None:
                self.store = Store.from_settings(self.settings)
            self.store.ensure_schema()
            ch = self.settings.clickhouse
            self.query_server = QueryServer(
                self.store, ch.query_host, ch.query_port, token_path=token_path(self.settings.data_dir)
            ).start()
            self.sink = ClickHouseSink(self.settings, self.store)
            self._sink_thread = threading.Thread(
                target=self.sink.run, args=(self._stop, self._sink_ready), name="sink", daemon=True
            )
            self._sink_thread.start()
        ms = self.settings.metrics
        if ms.enabled:
            self.metrics_server = MetricsServer(ms.host, ms.port, health=self._health).start()
            self.metrics_urls["stack"] = self.metrics_server.url
            if self.run_sink:
                self.metrics_urls["sink"] = self.metrics_server.url
        if self.run_gateway:
            gw = self.settings.gateway
            gw.port = gw.port or free_port(gw.host)
            self.gateway_url = f"http://{gw.host}:{gw.port}"
            ensure_operator_key(self.settings)
        env = {**child_env(self.settings), PARENT_PID_ENV: str(os.getpid())}
        py = sys.executable
        if self.run_gateway:
            self.children.append(
                _Child("gateway", [py, "-m", "gateway"], self._env(env, "gateway"), self.log_dir / "gateway.log")
            )
        if self.run_processor:
            self.children.append(
                _Child(
                    "processor",
                    [py, "-m", "stream_processors"],
                    self._env(env, "processor"),
                    self.log_dir / "processor.log",
                )
            )
        if self.run_consumers:
            for m in self.catalog:
                if not m.available:
                    continue
                for replica in range(self.replicas):
                    name = f"gpu-{m.name}" if self.replicas == 1 else f"gpu-{m.name}-{replica}"
                    cmd = [py, "-m", "gpu_consumers", "--model", m.name]
                    self.children.append(_Child(name, cmd, self._env(env, name), self.log_dir / f"{name}.log"))
        if self.run_sink:
            # After the children: it lists their metrics endpoints.
            self._write_stack_file()
        if self.run_gateway:
            self._wait_gateway()
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise_loop, name="supervisor", daemon=True)
            self._supervisor.start()

    def _wait_gateway(self, timeout: float = 90.0) -> None:
        """Return once the gateway answers, so the URL ``sluice up`` prints works at once."""
        assert self.gateway_url is not None
        child = next(c for c in self.children if c.name == "gateway")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise SluiceError(f"the gateway exited with {child.proc.returncode}:\n{child.tail()}")
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise SluiceError(f"the gateway did not answer within {timeout:.0f}s; see {child.log_path}")

    def _env(self, env: dict[str, str], name: str) -> dict[str, str]:
        """A child's environment: its own metrics port (kept across restarts), recorded."""
        m = self.settings.metrics
        if not m.enabled:
            return env
        port = free_port(m.host)
        self.metrics_urls[name] = f"http://{m.host}:{port}/metrics"
        return {**env, "SLUICE_METRICS": json.dumps({**m.model_dump(mode="json"), "port": port})}

    def _health(self) -> str | None:
        """Why the stack is unhealthy (``/healthz`` of this process), or None."""
        if self._failure:
            return self._failure
        if self.broker is not None and not self.broker.alive():
            return "the broker is not running"
        dead = [c.name for c in self.children if not c.alive()]
        return f"not running (restarting): {', '.join(dead)}" if dead else None

    def _write_stack_file(self) -> None:
        assert self.query_server is not None
        write_stack_file(
            self.settings.data_dir,
            {
                "query_url": self.query_server.url,
                "bootstrap_servers": self.settings.kafka.bootstrap_servers,
                "topic_prefix": self.settings.topic_prefix,
                **({"gateway_url": self.gateway_url} if self.gateway_url else {}),
                "metrics_urls": self.metrics_urls,
            },
        )

    # -- Supervision ----------------------------------------------------------------------------
    def _supervise_loop(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self.supervise_once()
            except SluiceError as exc:
                self._failure = str(exc)
                logger.error("%s", exc)
                return

    def supervise_once(self, now: float | None = None) -> None:
        """Restart dead children (with backoff); raise when one keeps dying or the broker died."""
        now = time.monotonic() if now is None else now
        for name, part in (("the embedded broker", self.broker), ("the broker's storage", self.object_store)):
            if part is not None and not part.alive():
                raise SluiceError(f"{name} exited; see {self.log_dir}")
        for child in self.children:
            if self._stopping.is_set() or child.alive():
                continue
            if child.restart_at is None:
                child.failures = [t for t in child.failures if now - t < self.restart_window_s] + [now]
                if len(child.failures) > self.max_restarts:
                    raise SluiceError(
                        f"{child.name} died {len(child.failures)} times within {self.restart_window_s:.0f}s "
                        f"(last exit code {child.proc.returncode}); last log lines ({child.log_path}):\n{child.tail()}"
                    )
                delay = min(30.0, 0.5 * 2 ** (len(child.failures) - 1))
                child.restart_at = now + delay
                logger.warning(
                    "%s exited with %s; restarting in %.1fs (%d failure(s) in %.0fs)",
                    child.name,
                    child.proc.returncode,
                    delay,
                    len(child.failures),
                    self.restart_window_s,
                )
            elif now >= child.restart_at:
                child.respawn()
                CHILD_RESTARTS.labels(child.name).inc()
                logger.warning("%s restarted (restart %d)", child.name, child.restarts)

    def check(self) -> None:
        """Raise if the stack gave up (a child kept dying, or the broker died)."""
        if self._failure is not None:
            raise SluiceError(self._failure)
        if not self.supervise:
            for child in self.children:
                if not child.alive():
                    raise SluiceError(
                        f"{child.name} exited with {child.proc.returncode}; "
                        f"last log lines ({child.log_path}):\n{child.tail()}"
                    )

    def wait_sink_ready(self, timeout: float = 30.0) -> bool:
        return self._sink_ready.wait(timeout)

    # -- Stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop in dependency order, each part once the parts that use it are gone."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
            self._supervisor = None
        consumers = [c for c in self.children if c.name.startswith("gpu-")]
        others = [c for c in self.children if c not in consumers]
        # Consumers first, all at once: each drains its in-flight requests (up to drain_s),
        # commits and leaves its group while the broker is still there.
        for child in consumers:
            child.signal(signal.SIGTERM)
        for child in consumers:
            child.stop(self.settings.engine.drain_s + 15)
        for child in others:
            child.stop(30)
        self.children.clear()
        self._stop.set()
        if self._sink_thread is not None:
            self._sink_thread.join(30)
            self._sink_thread = None
        if self.query_server is not None:
            self.query_server.stop()
            self.query_server = None
            (self.settings.data_dir / "stack.json").unlink(missing_ok=True)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.store is not None and self._owns_store:
            self.store.close()
            self.store = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.object_store is not None:
            self.object_store.stop()
            self.object_store = None

    def wait(self) -> None:
        """Block until the stack gives up or the process is interrupted (Ctrl-C, SIGTERM)."""
        while True:
            self.check()
            time.sleep(0.5)

    def pids(self) -> dict[str, int]:
        """Every process of the stack (this one included), for operators and tests."""
        out = {"stack": os.getpid()}
        for name, part in (("tansu", self.broker), ("storage", self.object_store)):
            if part is not None and part.pid is not None:
                out[name] = part.pid
        out.update({c.name: c.proc.pid for c in self.children})
        return out

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
