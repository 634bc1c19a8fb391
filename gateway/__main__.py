"""``python -m gateway``: the gateway process (``sluice up`` runs one as a child)."""

from __future__ import annotations

from sluice.lifecycle import die_with_parent
from sluice.logs import setup_logging
from sluice.metrics import serve_metrics
from sluice.settings import Settings


def main() -> None:
    setup_logging()
    die_with_parent()
    from gateway.server import Gateway

    settings = Settings()
    serve_metrics(settings.metrics)
    Gateway(settings).serve()


if __name__ == "__main__":
    main()
