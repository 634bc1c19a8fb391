"""``python -m stream_processors``: run the router as a Faust worker (settings from SLUICE_*)."""

from __future__ import annotations

import logging

import faust

from sluice.lifecycle import die_with_parent
from sluice.logs import setup_logging
from sluice.settings import Settings
from stream_processors.app import create_app


def main() -> None:
    setup_logging()
    die_with_parent()
    app = create_app(Settings())
    # Started programmatically rather than through Faust's click CLI (see pyproject.toml).
    worker = faust.Worker(app, loglevel=logging.getLogger().level, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
