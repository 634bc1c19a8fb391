"""Shared test hygiene: services skip locally when missing but fail in CI (as in dramatiq)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def unavailable(what: str, why: object) -> None:
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
