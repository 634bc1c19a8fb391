"""Logging setup shared by every Sluice process."""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging"]


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("SLUICE_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
