"""The local stack's process management and Apache Kafka runner, without a broker: children die
with their parent (binaries too), pid files name what a crashed run left, generated Kafka
configuration for one node and for a secured 3-node cluster, and where the jars are found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import pytest

from core.errors import BrokerError, SluiceError
from core.settings import Settings
from core.stackfile import read_stack_file, write_stack_file
from sluice.local import process
from sluice.local.kafka import KafkaCluster, KafkaTls, ScramUser, kafka_libs, kafka_tool
from sluice.local.process import ManagedProcess, free_port, leftover_pids, pid_alive
from tests.support import wait_until


def test_a_binary_child_dies_with_its_parent(tmp_path: Path) -> None:
    # A parent that starts `sleep` (a binary, not Python) through ManagedProcess, then is killed.
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from sluice.local.process import ManagedProcess
        p = ManagedProcess("sleeper", ["sleep", "300"], pid_dir=__import__("pathlib").Path({str(tmp_path)!r})).spawn()
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert pid_alive(child)
    assert leftover_pids(tmp_path) == {"sleeper": child}
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_until(lambda: pid_alive(child), lambda alive: not alive, timeout=10, what="the orphan to die")
    assert leftover_pids(tmp_path) == {}  # and its stale pid file is cleared


def test_leftover_pids_ignores_a_recycled_pid_of_another_program(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        # Between fork and exec the child's command line is still ours: wait for `sleep`.
        wait_until(
            lambda: Path(f"/proc/{other.pid}/cmdline").read_bytes(),
            lambda cmd: cmd.startswith(b"sleep"),
            timeout=10,
            what="the child to exec sleep",
        )
        (tmp_path / "tansu.pid").write_text(f"{other.pid}\ntansu\n")
        assert leftover_pids(tmp_path) == {}
        (tmp_path / "tansu.pid").write_text(f"{other.pid}\nsleep\n")
        assert leftover_pids(tmp_path) == {"tansu": other.pid}
    finally:
        other.kill()
        other.wait()


def test_a_process_that_exits_before_ready_says_so(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('bye'); raise SystemExit(3)"]
    p = ManagedProcess("quitter", cmd, log_path=tmp_path / "q.log")
    with pytest.raises(SluiceError, match=r"quitter exited with 3 before listening:\nbye"):
        p.spawn().wait_ready(lambda: False, 10, "listening")


def test_free_ports_leave_room_for_derived_ports() -> None:
    assert all(free_port(below=55535) < 55535 for _ in range(50))


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel may give the same ephemeral port to two binds in a row once the first socket is
    # closed; a stack that passed it to two children saw one of them fail to bind.
    offered = iter([40001, 40001, 40002, 40001, 40003])

    class _Socket:
        def __enter__(self) -> _Socket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, addr: tuple[str, int]) -> None:
            self.port = next(offered)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(process.socket, "socket", _Socket)
    monkeypatch.setattr(process, "_handed_out", deque(maxlen=16))
    assert [free_port(), free_port(), free_port()] == [40001, 40002, 40003]


def test_the_stack_file_is_complete_and_marked_ready(tmp_path: Path) -> None:
    write_stack_file(tmp_path, {"bootstrap_servers": "127.0.0.1:41234"})
    info = read_stack_file(tmp_path)
    assert info is not None and info["ready"] is True and info["pid"] == str(os.getpid())
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]  # written by rename, no leftovers
    # Settings with no broker configured find the running stack's broker there.
    s = Settings(data_dir=tmp_path)
    assert s.kafka.bootstrap_servers == "127.0.0.1:41234"
    assert "bootstrap_servers" not in s.kafka.model_fields_set
    configured = Settings(data_dir=tmp_path, kafka={"bootstrap_servers": "k:9092"})
    assert configured.kafka.bootstrap_servers == "k:9092"


def _props(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def test_a_secured_three_node_cluster_configuration(tmp_path: Path) -> None:
    tls = KafkaTls(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    for f, text in ((tls.ca, "CA"), (tls.server_cert, "CERT\n"), (tls.server_key, "KEY\n")):
        f.write_text(text)
    cluster = KafkaCluster(tmp_path / "c", nodes=3, tls=tls, scram_users=[ScramUser("u", "p")])
    for node in cluster.nodes:
        node.directory.mkdir(parents=True)
        node.ports = cluster.ports_for(node)
    props = [_props(cluster.write_config(n)) for n in cluster.nodes]
    voters = props[0]["controller.quorum.voters"].split(",")
    assert len(voters) == 3
    assert all(p["controller.quorum.voters"] == props[0]["controller.quorum.voters"] for p in props)
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert all(p["default.replication.factor"] == "3" and p["min.insync.replicas"] == "2" for p in props)
    p = props[0]
    assert p["listener.name.ssl.ssl.client.auth"] == "required"
    assert p["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert set(p["listener.security.protocol.map"].split(",")) == {
        "PLAINTEXT:PLAINTEXT",
        "CONTROLLER:PLAINTEXT",
        "SSL:SSL",
        "SASL_SSL:SASL_SSL",
    }
    assert "CONTROLLER" not in p["advertised.listeners"]
    # The PEM keystore is the key then the certificate, readable by its owner only.
    keystore = Path(p["listener.name.ssl.ssl.keystore.location"])
    assert keystore.read_text() == "KEY\nCERT\n" and keystore.stat().st_mode & 0o777 == 0o600
    # Ports are kept across restarts (the quorum's addresses are in every node's configuration).
    again = KafkaCluster(tmp_path / "c", nodes=3, tls=tls, scram_users=[ScramUser("u", "p")])
    assert [again.ports_for(n) for n in again.nodes] == [n.ports for n in cluster.nodes]
    assert cluster.sasl_ssl_bootstrap_servers.count("127.0.0.1:") == 3


def test_one_node_is_its_own_quorum_and_replicates_once(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path / "one")
    node = cluster.nodes[0]
    node.directory.mkdir(parents=True)
    node.ports = cluster.ports_for(node)
    p = _props(cluster.write_config(node))
    assert p["controller.quorum.voters"] == f"1@127.0.0.1:{node.ports['controller']}"
    assert p["offsets.topic.replication.factor"] == "1" and p["min.insync.replicas"] == "1"
    assert p["process.roles"] == "broker,controller"


def test_scram_users_need_tls(tmp_path: Path) -> None:
    with pytest.raises(SluiceError, match="SASL_SSL"):
        KafkaCluster(tmp_path, scram_users=[ScramUser("u", "p")])


def test_kafka_jars_are_found_in_an_install_a_tarball_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICE_LOCAL__KAFKA_HOME", raising=False)
    home = tmp_path / "kafka_2.13-4.3.1"
    (home / "libs").mkdir(parents=True)
    (home / "libs" / "kafka_2.13-4.3.1.jar").write_bytes(b"")
    assert kafka_libs(home) == home / "libs"
    import tarfile

    tgz = tmp_path / "dl" / "kafka_2.13-4.3.1.tgz"
    tgz.parent.mkdir()
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(home, arcname=home.name)
    assert kafka_libs(tgz, unpack_to=tmp_path / "unpacked") == tmp_path / "unpacked" / home.name / "libs"
    with pytest.raises(BrokerError, match="no Kafka jars"):
        kafka_libs(tmp_path / "dl")
    monkeypatch.setenv("SLUICE_LOCAL__KAFKA_HOME", str(home))
    cmd = kafka_tool("kafka-consumer-groups", "--describe")
    assert cmd[-2:] == ["org.apache.kafka.tools.consumer.group.ConsumerGroupCommand", "--describe"]
    assert cmd[cmd.index("-cp") + 1] == str(home / "libs" / "*")


def test_local_broker_setting_is_validated() -> None:
    assert Settings(local={"broker": "KAFKA"}).local.broker == "kafka"
    with pytest.raises(ValueError, match=r"local\.broker"):
        Settings(local={"broker": "redpanda"})
