"""Fixtures every tier shares; helper functions live in ``tests/support.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from core.catalog import ModelEntry
from tests.support import model_entry


@pytest.fixture
def make_entry() -> Callable[..., ModelEntry]:
    """``make_entry("tiny", tier=1, context_length=1024)``: a catalog entry with test defaults."""

    def make(name: str, **kw: Any) -> ModelEntry:
        return model_entry(name, **kw)

    return make
