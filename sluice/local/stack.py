"""The local stack: broker (and, durable, its object storage), topics, ClickHouse sink and query
endpoint in this process, and the Faust processor and the GPU consumers of each catalog model as
supervised child processes (as they would be separate services in production). Used by
``sluice up``, ``sluice demo`` and the tests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_core import to_jsonable_python

from analytics.query_server import QueryServer, token_path
from analytics.sink import ClickHouseSink
from analytics.store import Store
from core.catalog import Catalog, load_catalog
from core.errors import SluiceError
from core.lifecycle import PARENT_PID_ENV
from core.metrics import CHILD_RESTARTS, MetricsServer
from core.settings import Settings
from core.stackfile import write_stack_file
from core.topics import Topics, ensure_topics
from gateway.keys import KeyStore, keys_path
from sluice.local.broker import EmbeddedBroker
from sluice.local.kafka import KafkaCluster, java_binary, kafka_libs
from sluice.local.process import ManagedProcess, StartStop, free_port, leftover_pids, pid_alive
from sluice.local.storage import ObjectStore

__all__ = ["Child", "LocalStack", "child_env", "ensure_operator_key", "free_port", "operator_key_path"]

logger = logging.getLogger(__name__)


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
    # The child needs the secrets themselves (a JSON dump masks SecretStr): passed in its
    # environment, as a deployment passes them.
    data = to_jsonable_python(_reveal(settings.model_dump()))
    for key, value in data.items():
        if value is None:
            continue
        env[f"SLUICE_{key.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("SLUICE_LOG_LEVEL", os.environ.get("SLUICE_LOG_LEVEL", "INFO"))
    return env


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal(v) for v in value]
    return value


class Child(ManagedProcess):
    """A supervised child of the stack (router, GPU consumer, gateway): started at once, its
    restarts and recent failures counted for the supervisor."""

    log_path: Path

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, *, pid_dir: Path | None = None
    ) -> None:
        super().__init__(name, cmd, env=env, log_path=log, pid_dir=pid_dir, stop_timeout=30.0)
        self.failures: list[float] = []
        self.restart_at: float | None = None
        self.restarts = 0
        self.spawn()

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None
        return self.proc

    def respawn(self) -> None:
        self.spawn()
        self.restart_at = None
        self.restarts += 1


def resolve_broker(kind: str, *, durable: bool, settings: Settings) -> str:
    """The embedded broker to start: ``auto`` means Apache Kafka for a durable stack where Java and
    Kafka's jars are present (it recovers much faster, see bench P13), else tansu."""
    if kind != "auto":
        return kind
    if not durable:
        return "tansu"
    try:
        java_binary()
        kafka_libs(settings.local.kafka_home)
    except SluiceError as exc:
        logger.info("durable stack on tansu: %s", exc)
        return "tansu"
    return "kafka"


class LocalStack(StartStop):
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
        routers: int = 1,
        durable: bool = False,
        supervise: bool = True,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        run_gateway: bool = False,
        broker: str | None = None,
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
        # "kafka" or "tansu" for the embedded broker (None: the `local.broker` setting).
        self.broker_kind = resolve_broker(broker or self.settings.local.broker, durable=durable, settings=self.settings)
        self.pid_dir = self.settings.data_dir / "pids"
        self.kafka: KafkaCluster | None = None
        self.run_processor = run_processor
        self.run_consumers = run_consumers
        self.run_sink = run_sink
        # GPU consumers per model, in one consumer group (partitions are shared among them).
        self.replicas = replicas
        # Router workers: one Faust app, one group; request and table partitions are shared.
        self.routers = routers
        self.run_gateway = run_gateway
        self.gateway_url: str | None = None
        self._gateway_answered = False
        self.durable = durable
        # On durable tansu each produce request is an object-store write, and librdkafka sends
        # one per partition (see processor.producer): Faust's producer sends one per batch.
        tansu_on_s3 = self.embedded_broker and self.broker_kind == "tansu" and durable
        if tansu_on_s3 and "producer" not in self.settings.processor.model_fields_set:
            self.settings = self.settings.evolve(processor={"producer": "faust"})
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
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._sink_ready = threading.Event()
        self._sink_thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        # Set once stack.json lists everything (and everything in it answers).
        self.ready = threading.Event()
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
        self._claim_data_dir()
        if self.embedded_broker:
            if self.broker_kind == "kafka":
                kafka_dir = self.settings.data_dir / ("kafka" if self.durable else "kafka-ephemeral")
                if not self.durable:
                    shutil.rmtree(kafka_dir, ignore_errors=True)
                self.kafka = KafkaCluster(
                    kafka_dir,
                    home=self.settings.local.kafka_home,
                    pid_dir=self.pid_dir,
                ).start()
                self.settings = self.settings.evolve(kafka={"bootstrap_servers": self.kafka.bootstrap_servers})
            else:
                storage_env = None
                if self.durable:
                    self.object_store = ObjectStore(
                        self.settings.data_dir / "broker", self.log_dir / "storage.log", pid_dir=self.pid_dir
                    ).start()
                    storage_env = self.object_store.client_env()
                self.broker = EmbeddedBroker(
                    self.broker_port, log_path=self.log_dir / "tansu.log", storage_env=storage_env, pid_dir=self.pid_dir
                ).start()
                self.settings = self.settings.evolve(kafka={"bootstrap_servers": self.broker.bootstrap_servers})
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
            if not gw.port:
                self.settings = self.settings.evolve(gateway={"port": free_port(gw.host)})
                gw = self.settings.gateway
            self.gateway_url = f"http://{gw.host}:{gw.port}"
            ensure_operator_key(self.settings)
        if self.run_sink:
            # The children (the gateway among them) find the query endpoint here.
            self._write_stack_file(ready=False)
        env = {**child_env(self.settings), PARENT_PID_ENV: str(os.getpid())}
        py = sys.executable
        if self.run_gateway:
            self.children.append(
                Child(
                    "gateway",
                    [py, "-m", "gateway"],
                    self._env(env, "gateway"),
                    self.log_dir / "gateway.log",
                    pid_dir=self.pid_dir,
                )
            )
        if self.run_processor:
            for worker in range(self.routers):
                name = "processor" if self.routers == 1 else f"processor-{worker}"
                self.children.append(
                    Child(
                        name,
                        [py, "-m", "stream_processors"],
                        self._env(env, name),
                        self.log_dir / f"{name}.log",
                        pid_dir=self.pid_dir,
                    )
                )
        if self.run_consumers:
            for m in self.catalog:
                if not m.available:
                    continue
                for replica in range(self.replicas):
                    name = f"gpu-{m.name}" if self.replicas == 1 else f"gpu-{m.name}-{replica}"
                    cmd = [py, "-m", "gpu_consumers", "--model", m.name]
                    self.children.append(
                        Child(name, cmd, self._env(env, name), self.log_dir / f"{name}.log", pid_dir=self.pid_dir)
                    )
        if self.run_gateway:
            self._wait_gateway()
            if self.run_sink:
                # The CLI's batch commands find the gateway here as soon as it answers, not only
                # once every child's metrics endpoint does.
                self._write_stack_file(ready=False)
        if self.run_sink:
            # Again, complete, once the children's endpoints answer (the gateway's already does):
            # in the background, so a stack in a test starts no slower; `sluice up` waits for it.
            threading.Thread(target=self._finish_stack_file, name="stack-file", daemon=True).start()
        else:
            self.ready.set()
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise_loop, name="supervisor", daemon=True)
            self._supervisor.start()

    def _claim_data_dir(self) -> None:
        """Refuse a data directory another live stack runs on; stop what a crashed one left."""
        stack_pid_file = self.pid_dir / "stack.pid"
        left = leftover_pids(self.pid_dir)
        owner = left.pop("stack", None)
        if owner is not None:
            raise SluiceError(
                f"another Sluice stack (pid {owner}) runs on {self.settings.data_dir}: stop it (kill {owner}) "
                "or give this one another SLUICE_DATA_DIR"
            )
        for name, pid in left.items():
            logger.warning("stopping %s (pid %d), left running by an earlier stack that crashed", name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while left and time.monotonic() < deadline:
            left = {n: p for n, p in left.items() if pid_alive(p)}
            time.sleep(0.1)
        for name, pid in left.items():
            logger.warning("killing %s (pid %d): it did not stop on SIGTERM", name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for f in self.pid_dir.glob("*.pid"):
            f.unlink(missing_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        stack_pid_file.write_text(f"{os.getpid()}\n{Path(sys.executable).name}\n")

    def _wait_gateway(self, timeout: float = 90.0) -> None:
        """Return once the gateway answers, so the URL ``sluice up`` prints works at once."""
        assert self.gateway_url is not None
        child = next(c for c in self.children if c.name == "gateway")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise SluiceError(f"the gateway exited with {child.returncode}:\n{child.tail()}")
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=1):
                    self._gateway_answered = True
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
        if (self.broker is not None and not self.broker.alive()) or (self.kafka is not None and not self.kafka.alive()):
            return "the broker is not running"
        dead = [c.name for c in self.children if not c.alive()]
        return f"not running (restarting): {', '.join(dead)}" if dead else None

    def _write_stack_file(self, *, ready: bool) -> None:
        assert self.query_server is not None
        info: dict[str, object] = {
            "query_url": self.query_server.url,
            "bootstrap_servers": self.settings.kafka.bootstrap_servers,
            "topic_prefix": self.settings.topic_prefix,
        }
        if self.gateway_url and self._gateway_answered:
            info["gateway_url"] = self.gateway_url
        if ready:
            info["metrics_urls"] = self.metrics_urls
        write_stack_file(self.settings.data_dir, info, ready=ready)

    def _finish_stack_file(self) -> None:
        self._wait_metrics()
        if not self._stopping.is_set():
            self._write_stack_file(ready=True)
            self.ready.set()

    def _wait_metrics(self, timeout: float = 60.0) -> None:
        """Until every metrics endpoint the stack file will list answers (children load first)."""
        deadline = time.monotonic() + timeout
        pending = dict(self.metrics_urls)
        while pending and time.monotonic() < deadline and not self._stopping.is_set():
            for name, url in list(pending.items()):
                try:
                    with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=1):
                        pending.pop(name)
                except urllib.error.HTTPError:
                    pending.pop(name)  # it answers (503 while loading its engine is an answer)
                except OSError:
                    pass
            if pending:
                time.sleep(0.1)
        if pending and not self._stopping.is_set():
            logger.warning("metrics endpoints not answering yet: %s", ", ".join(sorted(pending)))

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
        for name, part in (
            ("the embedded broker", self.broker),
            ("the broker's storage", self.object_store),
            ("Apache Kafka", self.kafka),
        ):
            if part is not None and not part.alive():
                raise SluiceError(f"{name} exited; see {self.log_dir} and {self.settings.data_dir / 'kafka'}")
        for child in self.children:
            if self._stopping.is_set() or child.alive():
                continue
            if child.restart_at is None:
                child.failures = [t for t in child.failures if now - t < self.restart_window_s] + [now]
                if len(child.failures) > self.max_restarts:
                    raise SluiceError(
                        f"{child.name} died {len(child.failures)} times within {self.restart_window_s:.0f}s "
                        f"(last exit code {child.returncode}); last log lines ({child.log_path}):\n{child.tail()}"
                    )
                delay = min(30.0, 0.5 * 2 ** (len(child.failures) - 1))
                child.restart_at = now + delay
                logger.warning(
                    "%s exited with %s; restarting in %.1fs (%d failure(s) in %.0fs)",
                    child.name,
                    child.returncode,
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
                        f"{child.name} exited with {child.returncode}; "
                        f"last log lines ({child.log_path}):\n{child.tail()}"
                    )

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
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
        if self.object_store is not None:
            self.object_store.stop()
            self.object_store = None
        (self.pid_dir / "stack.pid").unlink(missing_ok=True)

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
        if self.kafka is not None:
            out.update({f"kafka-{i + 1}": pid for i, pid in enumerate(self.kafka.pids())})
        out.update({c.name: c.pid for c in self.children if c.pid is not None})
        return out
