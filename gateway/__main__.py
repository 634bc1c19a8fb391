"""``python -m gateway``: the gateway process (``sluice up`` runs one as a child)."""

from __future__ import annotations

from core.lifecycle import die_with_parent
from core.logs import setup_logging
from core.metrics import serve_metrics
from core.settings import Settings


def main() -> None:
    setup_logging()
    die_with_parent()
    from gateway.server import Gateway

    settings = Settings()
    serve_metrics(settings.metrics)
    Gateway(settings).serve()


if __name__ == "__main__":
    main()
