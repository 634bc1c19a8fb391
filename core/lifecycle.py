"""Process lifecycle shared by the Sluice services started as children of a local stack."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

__all__ = ["PARENT_PID_ENV", "die_with_parent"]

logger = logging.getLogger(__name__)

# Set by the local stack for its children: the pid whose death must stop them.
PARENT_PID_ENV = "SLUICE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """If a local stack started this process, get SIGTERM when the stack's process dies (Linux), so
    a killed stack leaves no orphan holding ports and data directories; the usual SIGTERM handling
    (drain, commit) then runs."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("cannot ask to be stopped with the parent (errno %d)", ctypes.get_errno())
    if os.getppid() != int(parent):
        # The parent died before the request took effect.
        os.kill(os.getpid(), signal.SIGTERM)
