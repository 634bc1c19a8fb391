"""Apache Kafka on this host: KRaft brokers (combined broker + controller) started from Kafka's
jars, for ``sluice up --broker kafka``, the integration tier and fault tests.

Where the jars come from, first found: the ``local.kafka_home`` setting
(``SLUICE_LOCAL__KAFKA_HOME``: a Kafka install or its ``.tgz``, whose ``libs/`` holds the jars, or
a folder of jars), else the folder that
``scripts/bootstrap.sh`` fills from ``deploy/kafka/pom.xml`` with Maven (``.sluice/kafka/libs`` in
a source checkout). Java 17 or newer runs them (``JAVA_HOME``, else ``java`` on ``PATH``).

Each node gets a generated ``server.properties`` and log4j2 configuration in its own directory,
storage formatted once with Kafka's storage tool (so a restart finds its log), free loopback ports
(kept across restarts in ``ports.json``), and its output in ``kafka-<id>.log``. A cluster of three
nodes has one controller quorum of all three, replication factor 3 and ``min.insync.replicas=2``.
Listeners beyond PLAINTEXT are optional: SSL requiring client certificates, and SASL_SSL with
SCRAM-SHA-512 users created at format time.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from core import clients
from core.errors import BrokerError, SluiceError
from core.settings import KafkaSettings
from sluice.local.process import ManagedProcess, StartStop, free_port

__all__ = [
    "KafkaCluster",
    "KafkaTls",
    "ScramUser",
    "java_binary",
    "kafka_classpath",
    "kafka_libs",
    "kafka_tool",
]

# Kafka's CLI tools by their script names (the scripts are not in the jars; their main classes are).
TOOLS = {
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-share-groups": "org.apache.kafka.tools.consumer.group.ShareGroupCommand",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-configs": "org.apache.kafka.tools.ConfigCommand",
    "kafka-storage": "kafka.tools.StorageTool",
}

logger = logging.getLogger(__name__)

# Where bootstrap puts the jars in a source checkout (ignored by git).
_CHECKOUT_LIBS = Path(__file__).resolve().parents[2] / ".sluice" / "kafka" / "libs"
HOME_ENV = "SLUICE_LOCAL__KAFKA_HOME"

_LOG4J = """Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: state.change.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: WARN
      - name: kafka.log.LogCleaner
        level: WARN
"""


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise BrokerError("Apache Kafka needs Java 17 or newer: install a JDK (or set JAVA_HOME)")
    return found


def kafka_libs(home: str | Path | None = None, *, unpack_to: Path | None = None) -> Path:
    """The folder of Kafka's jars (see the module docstring for where it is looked for)."""
    configured = home or os.environ.get(HOME_ENV)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and path.name.endswith((".tgz", ".tar.gz")):
            path = _unpack(path, unpack_to or path.parent)
        for candidate in (path / "libs", path):
            if any(candidate.glob("kafka_2.13-*.jar")):
                return candidate
        raise BrokerError(f"{HOME_ENV}={configured}: no Kafka jars (libs/kafka_2.13-*.jar) there")
    if any(_CHECKOUT_LIBS.glob("kafka_2.13-*.jar")):
        return _CHECKOUT_LIBS
    raise BrokerError(
        "Apache Kafka is not installed: run scripts/bootstrap.sh (needs Java and Maven), or set "
        f"{HOME_ENV} to a Kafka 4.2+ install or tarball"
    )


def _unpack(tarball: Path, into: Path) -> Path:
    name = tarball.name.removesuffix(".tgz").removesuffix(".tar.gz")
    target = into / name
    if not target.is_dir():
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(into, filter="data")
    return target


def kafka_classpath(home: str | Path | None = None) -> str:
    return str(kafka_libs(home) / "*")


def kafka_tool(tool: str, *args: str, home: str | Path | None = None) -> list[str]:
    """The command line of one of Kafka's own tools, e.g. ``kafka_tool("kafka-consumer-groups",
    "--bootstrap-server", servers, "--describe", "--group", group)``."""
    return [java_binary(), "-Xmx256m", "-cp", kafka_classpath(home), TOOLS[tool], *args]


def kafka_version(libs: Path) -> str:
    jar = next(iter(sorted(libs.glob("kafka_2.13-*.jar"))))
    return jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")


@dataclass(frozen=True)
class KafkaTls:
    """PEM files for the broker's TLS listeners (key unencrypted, PKCS#8)."""

    ca: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ScramUser:
    name: str
    password: str


@dataclass
class _Node:
    node_id: int
    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: ManagedProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"kafka-{self.node_id}.log"


class KafkaCluster(StartStop):
    """``nodes`` combined KRaft nodes on loopback under ``directory`` (one is a single broker).

    ``start()`` formats storage where it is new and returns once every broker serves metadata;
    ``stop()`` sends SIGTERM (Kafka's controlled shutdown) and waits at most ``stop_timeout``;
    ``kill(i)`` is kill -9 of node ``i``; ``restart(i)`` starts it again on the same ports."""

    def __init__(
        self,
        directory: Path,
        nodes: int = 1,
        *,
        home: str | Path | None = None,
        tls: KafkaTls | None = None,
        scram_users: Iterable[ScramUser] = (),
        pid_dir: Path | None = None,
        heap: str = "768m",
        stop_timeout: float = 30.0,
        properties: dict[str, str] | None = None,
    ) -> None:
        if nodes < 1:
            raise SluiceError("a Kafka cluster needs at least one node")
        self.directory = directory
        self.home = home
        self.tls = tls
        self.scram_users = list(scram_users)
        if self.scram_users and tls is None:
            raise SluiceError("SCRAM users need the TLS files: their listener is SASL_SSL")
        self.pid_dir = pid_dir
        self.heap = heap
        self.stop_timeout = stop_timeout
        self.properties = properties or {}
        self.nodes = [_Node(i + 1, directory / f"node-{i + 1}") for i in range(nodes)]
        self.version = ""

    # -- Addresses ------------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.ports['plaintext']}" for n in self.nodes)

    @property
    def ssl_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.ports['ssl']}" for n in self.nodes)

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.ports['sasl_ssl']}" for n in self.nodes)

    def node_address(self, index: int) -> str:
        return f"127.0.0.1:{self.nodes[index].ports['plaintext']}"

    def pid(self, index: int) -> int | None:
        proc = self.nodes[index].proc
        return proc.pid if proc is not None else None

    def pids(self) -> list[int]:
        return [p for p in (self.pid(i) for i in range(len(self.nodes))) if p is not None]

    def alive(self) -> bool:
        return all(n.proc is not None and n.proc.alive() for n in self.nodes)

    @property
    def log_paths(self) -> list[Path]:
        return [n.log_path for n in self.nodes]

    # -- Lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> Self:
        libs = kafka_libs(self.home, unpack_to=self.directory)
        self.version = kafka_version(libs)
        java = java_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.ports = self.ports_for(node)
        cluster_id = self._cluster_id(java, libs)
        formats = [self._format(node, java, libs, cluster_id) for node in self.nodes]
        for node, proc in formats:
            if proc is not None and proc.wait() != 0:
                raise BrokerError(
                    f"formatting Kafka storage of node {node.node_id} failed:\n{_tail(node.directory / 'format.log')}"
                )
        for node in self.nodes:
            self._spawn(node, java, libs)
        try:
            self._wait_brokers(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Apache Kafka %s: %d node(s) serving on %s (%s)",
            self.version,
            len(self.nodes),
            self.bootstrap_servers,
            self.directory,
        )
        return self

    def ports_for(self, node: _Node) -> dict[str, int]:
        saved = node.directory / "ports.json"
        names = ["plaintext", "controller"] + (["ssl"] if self.tls else []) + (["sasl_ssl"] if self.scram_users else [])
        ports: dict[str, int] = {}
        if saved.is_file():
            ports = {k: int(v) for k, v in json.loads(saved.read_text()).items() if k in names}
        for name in names:
            ports.setdefault(name, free_port())
        saved.write_text(json.dumps(ports))
        return ports

    def _cluster_id(self, java: str, libs: Path) -> str:
        path = self.directory / "cluster.id"
        if path.is_file():
            return path.read_text().strip()
        # Kafka's own random-uuid format (base64url of 16 bytes, never starting with "-"),
        # without starting a JVM for it.
        cid = "-"
        while cid.startswith("-"):
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(cid)
        return cid

    def _voters(self) -> str:
        return ",".join(f"{n.node_id}@127.0.0.1:{n.ports['controller']}" for n in self.nodes)

    def _server_properties(self, node: _Node) -> dict[str, str]:
        n = len(self.nodes)
        listeners = {"PLAINTEXT": node.ports["plaintext"], "CONTROLLER": node.ports["controller"]}
        protocol_map = {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT"}
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": self._voters(),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.directory / "data"),
            "num.partitions": "3",
            "default.replication.factor": str(min(n, 3)),
            "min.insync.replicas": "2" if n >= 3 else "1",
            "offsets.topic.replication.factor": str(min(n, 3)),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(min(n, 3)),
            "transaction.state.log.min.isr": "2" if n >= 3 else "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(min(n, 3)),
            "share.coordinator.state.topic.min.isr": "2" if n >= 3 else "1",
            "share.coordinator.state.topic.num.partitions": "10",
            # A local broker for development and tests: the first group join starts at once.
            "group.initial.rebalance.delay.ms": "0",
            # A node restarted after a crash cannot register again until the controller has
            # expired its previous registration (9 s by default): on loopback, expire it in 2.5 s.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "2500",
            # Transactions of a consumer that was killed are aborted within a minute, not 15.
            "transaction.max.timeout.ms": "900000",
            "log.retention.hours": "168",
            "unclean.leader.election.enable": "false",
            # Share groups (GPU consumers): a generation may hold its record lock for minutes
            # (the broker's cap is 60 s by default), and a dead member's records come back
            # after seconds, not 45.
            "group.share.max.record.lock.duration.ms": "3600000",
            "group.share.min.session.timeout.ms": "6000",
            "group.share.session.timeout.ms": "6000",
            "group.share.min.heartbeat.interval.ms": "1000",
            "group.share.heartbeat.interval.ms": "1000",
        }
        if self.tls is not None:
            listeners["SSL"] = node.ports["ssl"]
            protocol_map["SSL"] = "SSL"
            tls = {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self._keystore()),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.tls.ca),
            }
            props.update({f"listener.name.ssl.{k}": v for k, v in tls.items()})
            props["listener.name.ssl.ssl.client.auth"] = "required"
            if self.scram_users:
                listeners["SASL_SSL"] = node.ports["sasl_ssl"]
                protocol_map["SASL_SSL"] = "SASL_SSL"
                props.update({f"listener.name.sasl_ssl.{k}": v for k, v in tls.items()})
                props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] = "SCRAM-SHA-512"
                props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
                props["sasl.enabled.mechanisms"] = "SCRAM-SHA-512"
        props["listeners"] = ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items())
        props["advertised.listeners"] = ",".join(
            f"{name}://127.0.0.1:{port}" for name, port in listeners.items() if name != "CONTROLLER"
        )
        props["listener.security.protocol.map"] = ",".join(f"{k}:{v}" for k, v in protocol_map.items())
        props.update(self.properties)
        return props

    def _keystore(self) -> Path:
        """Kafka's PEM keystore is one file: the private key, then the certificate chain."""
        assert self.tls is not None
        path = self.directory / "keystore.pem"
        path.write_text(self.tls.server_key.read_text() + self.tls.server_cert.read_text())
        path.chmod(0o600)
        return path

    def write_config(self, node: _Node) -> Path:
        path = node.directory / "server.properties"
        props = self._server_properties(node)
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (node.directory / "log4j2.yaml").write_text(_LOG4J)
        return path

    def _format(
        self, node: _Node, java: str, libs: Path, cluster_id: str
    ) -> tuple[_Node, subprocess.Popen[bytes] | None]:
        config = self.write_config(node)
        if (node.directory / "data" / "meta.properties").is_file():
            return node, None
        cmd = [java, "-Xmx256m", *self._log_opts(node), "-cp", str(libs / "*"), "kafka.tools.StorageTool"]
        cmd += ["format", f"--cluster-id={cluster_id}", "-c", str(config), "--ignore-formatted"]
        for user in self.scram_users:
            cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user.name},password={user.password}]"]
        with (node.directory / "format.log").open("wb") as log:
            return node, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _log_opts(self, node: _Node) -> list[str]:
        return [f"-Dlog4j2.configurationFile={node.directory / 'log4j2.yaml'}", f"-Dkafka.logs.dir={node.directory}"]

    def _spawn(self, node: _Node, java: str, libs: Path) -> None:
        config = self.write_config(node)
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            *self._log_opts(node),
            "-cp",
            str(libs / "*"),
            "kafka.Kafka",
            str(config),
        ]
        node.proc = ManagedProcess(
            f"kafka-{node.node_id}",
            cmd,
            env=dict(os.environ),
            log_path=node.log_path,
            pid_dir=self.pid_dir,
            stop_timeout=self.stop_timeout,
        ).spawn()

    def _wait_brokers(self, timeout: float, expect: int | None = None) -> None:
        expect = expect or len(self.nodes)
        deadline = time.monotonic() + timeout
        admin = _admin(self.bootstrap_servers)
        last: object = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and not node.proc.alive():
                    raise BrokerError(
                        f"Kafka node {node.node_id} exited with {node.proc.returncode}:\n{node.proc.tail(30)}"
                    )
            try:
                brokers = admin.list_topics(timeout=2).brokers
                if len(brokers) >= expect:
                    return
                last = f"{len(brokers)} of {expect} brokers"
            except Exception as exc:
                last = exc
            time.sleep(0.2)
        raise BrokerError(f"Apache Kafka did not serve metadata within {timeout:.0f}s ({last}); see {self.directory}")

    def kill(self, index: int) -> None:
        """kill -9 of one node (a crash: no controlled shutdown)."""
        proc = self.nodes[index].proc
        if proc is not None and proc.proc is not None and proc.alive():
            proc.signal(signal.SIGKILL)
            proc.proc.wait()
        if proc is not None:
            proc.stop(0)

    def stop_node(self, index: int) -> None:
        proc = self.nodes[index].proc
        if proc is not None:
            proc.stop()

    def restart(self, index: int, timeout: float = 90.0) -> None:
        node = self.nodes[index]
        if node.proc is not None and node.proc.alive():
            node.proc.stop()
        libs = kafka_libs(self.home, unpack_to=self.directory)
        self._spawn(node, java_binary(), libs)
        self._wait_node(index, timeout)

    def _wait_node(self, index: int, timeout: float) -> None:
        node = self.nodes[index]
        admin = _admin(self.node_address(index))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is None or not node.proc.alive():
                raise BrokerError(f"Kafka node {node.node_id} exited:\n{node.proc.tail(30) if node.proc else ''}")
            try:
                if node.node_id in admin.list_topics(timeout=2).brokers:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise BrokerError(f"Kafka node {node.node_id} did not rejoin within {timeout:.0f}s")

    def stop(self) -> None:
        # All at once: each node's controlled shutdown needs the others' quorum only briefly.
        for node in self.nodes:
            if node.proc is not None:
                node.proc.signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop()


def _admin(servers: str) -> AdminClient:
    # Quiet while the broker starts: refused connections are expected until it listens.
    return clients.admin(KafkaSettings(bootstrap_servers=servers, extra={"log_level": "0"}), "kafka-runner")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
