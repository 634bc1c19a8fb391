"""``<data_dir>/stack.json``: how other processes find a running local stack.

Everything the file lists answers when it is written, atomically (a reader sees a whole file or
none). A stack writes it up to three times: first with the broker and the query endpoint (its
children find the query endpoint there) and ``"ready": false``, again with the gateway once it
answers, then, once every child's metrics endpoint is up, with everything and ``"ready": true``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_stack_file", "write_stack_file"]


def write_stack_file(data_dir: Path, info: dict[str, Any], *, ready: bool = True) -> None:
    tmp = data_dir / f".stack.json.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": str(os.getpid()), **info, "ready": ready}))
    tmp.replace(data_dir / "stack.json")


def read_stack_file(data_dir: Path) -> dict[str, Any] | None:
    """The running stack's endpoints, if a live process owns ``data_dir``."""
    path = data_dir / "stack.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info
