"""``<data_dir>/stack.json``: how other processes find a running local stack.

The file is written once everything it lists answers (the broker, the query endpoint, the
gateway), atomically (a reader sees the whole file or none), with ``"ready": true``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_stack_file", "write_stack_file"]


def write_stack_file(data_dir: Path, info: dict[str, Any]) -> None:
    tmp = data_dir / f".stack.json.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": str(os.getpid()), **info, "ready": True}))
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
