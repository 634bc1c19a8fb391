"""Helpers shared by every test tier (imported as ``tests.support``; conftest files hold only
fixtures). Services skip locally when missing but fail in CI, as in dramatiq."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import pytest

from core.catalog import ModelEntry
from core.settings import Settings

__all__ = ["cli_json", "model_entry", "run_cli", "unavailable", "wait_until"]

T = TypeVar("T")


def unavailable(what: str, why: object) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but unavailable: {why}")
    pytest.skip(f"{what} unavailable: {why}")


def wait_until(
    fn: Callable[[], T],
    until: Callable[[T], object] = bool,
    *,
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "",
) -> T:
    """Call ``fn`` until ``until(value)`` holds; return that value or fail with the last one."""
    deadline = time.monotonic() + timeout
    last: T = fn()
    while not until(last):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")
        time.sleep(interval)
        last = fn()
    return last


def model_entry(
    name: str,
    *,
    tier: int = 1,
    context_length: int = 1024,
    input_price_per_1m: float = 0.1,
    output_price_per_1m: float = 0.2,
    source: str = "builtin:unused-by-instant-engine",
    **more: Any,
) -> ModelEntry:
    """A catalog entry with test defaults; name what the test is about, leave the rest."""
    return ModelEntry(
        name=name,
        source=source,
        tier=tier,
        context_length=context_length,
        input_price_per_1m=input_price_per_1m,
        output_price_per_1m=output_price_per_1m,
        **more,
    )


def run_cli(settings: Settings | None, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``sluice ARGS`` in another process, as a user runs it (settings passed as SLUICE_* env)."""
    from sluice.local.stack import child_env

    env = child_env(settings) if settings is not None else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def cli_json(settings: Settings, *args: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    """``sluice ARGS --format json``: the JSON lines it printed (fails the test on a non-zero exit)."""
    proc = run_cli(settings, *args, "--format", "json", timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
