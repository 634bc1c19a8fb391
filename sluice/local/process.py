"""One way to run a child process of the local stack: its own session, its log appended to a file,
stopped with the parent, a pid file, a bounded stop.

Every child (tansu, SeaweedFS, Apache Kafka, the router, the GPU consumers, the gateway) is started
through :class:`ManagedProcess`, so a kill -9 of ``sluice up`` leaves nothing running: on Linux each
child asks the kernel, between fork and exec, for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), which works for binaries as well as for Python. Pid files under the data
directory let the next start find what an earlier, crashed run left on other platforms.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from core.errors import SluiceError

__all__ = [
    "ManagedProcess",
    "StartStop",
    "free_port",
    "leftover_pids",
    "pid_alive",
    "stop_process",
]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# Ports this process handed out lately. A port is only reserved until its socket closes, so two
# calls in a row may get the same one back; a stack that gives it to two children (the gateway and
# a metrics endpoint) sees one of them fail to bind, and the other answer on the first one's URL.
_handed_out: deque[int] = deque(maxlen=4096)
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1", *, below: int = 65536) -> int:
    """A free TCP port on ``host`` (below ``below``: SeaweedFS derives gRPC ports at +10000), not
    one this process handed out before."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with _handed_out_lock:
            if port < below and port not in _handed_out:
                _handed_out.append(port)
                return port
    raise SluiceError(f"no free port below {below} on {host}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (it holds no port), but kill(0) succeeds on it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone between the two looks
    except OSError:
        return True  # no /proc here: kill(0) said it exists


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


def _die_with_parent() -> None:
    """Run in the child between fork and exec (async-signal-safe calls only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StartStop:
    """``with part:`` for the stack's parts: ``start()`` on entry, ``stop()`` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess:
    """A child process: started in its own session (a terminal's Ctrl-C reaches only the parent,
    which stops children in order), output appended to ``log_path`` across restarts, SIGTERM when
    the parent dies, its pid in ``pid_dir/<name>.pid`` while it runs."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        pid_dir: Path | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.pid_dir = pid_dir
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> Self:
        if self.log_path is not None and self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            # The program's name beside the pid: a recycled pid is not mistaken for ours.
            (self.pid_dir / f"{self.name}.pid").write_text(f"{self.proc.pid}\n{Path(self.cmd[0]).name}\n")
        return self

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> Self:
        """Poll ``ready`` until it holds; stop the process and raise if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise SluiceError(f"{self.name} exited with {self.returncode} before {what}:\n{self.tail()}")
            if ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise SluiceError(f"{self.name} did not {what} within {timeout:.0f}s (see {self.log_path})")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> None:
        stop_process(self.proc, self.stop_timeout if timeout is None else timeout, self.name)
        if self.pid_dir is not None:
            (self.pid_dir / f"{self.name}.pid").unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.spawn()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def leftover_pids(pid_dir: Path) -> dict[str, int]:
    """Processes named by pid files in ``pid_dir`` that are still alive (a crashed run's)."""
    out: dict[str, int] = {}
    if not pid_dir.is_dir():
        return out
    for f in sorted(pid_dir.glob("*.pid")):
        with contextlib.suppress(ValueError, OSError, IndexError):
            lines = f.read_text().split()
            pid = int(lines[0])
            if pid != os.getpid() and pid_alive(pid) and _runs(pid, lines[1] if len(lines) > 1 else ""):
                out[f.stem] = pid
                continue
        f.unlink(missing_ok=True)
    return out


def _runs(pid: int, program: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file
    return not program or program.encode() in cmdline
