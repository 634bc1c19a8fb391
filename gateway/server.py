"""The gateway process: the HTTP API under uvicorn, the batch tracker, the webhook worker, the
result fan-out, and the result reader and wait estimate of the synchronous tier, sharing one
producer. ``sluice gateway`` runs it; ``sluice up`` starts it too."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from analytics.query import open_query
from core import clients
from core.catalog import load_catalog
from core.kafka import TopicReader
from core.metrics import register_collector
from core.quota import QuotaLedger, follow_ledger, ledger_wanted, load_ledger
from core.settings import Settings
from gateway.api import Services, create_api
from gateway.batches import BatchService
from gateway.capacity import Capacity, capacity_gauges
from gateway.fanout import ResultFanout
from gateway.files import open_file_store
from gateway.keys import KeyStore, keys_path
from gateway.waiting import ResultWaiter
from gateway.webhooks import WebhookWorker, new_secret
from producers import SluiceClient

__all__ = ["Gateway", "webhook_secrets"]

logger = logging.getLogger(__name__)


def webhook_secrets(settings: Settings) -> list[str]:
    """The configured signing secrets, or the one kept in ``<data_dir>/webhook_secret`` (made on
    first use, mode 0600) so a single-machine stack signs without any setup."""
    if settings.webhooks.secrets:
        return [s.get_secret_value() for s in settings.webhooks.secrets]
    path = settings.data_dir / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_secret())
    return [path.read_text().strip()]


class Gateway:
    def __init__(self, settings: Settings) -> None:
        settings = settings.evolve(webhooks={"secrets": webhook_secrets(settings)})
        self.settings = settings
        self.publisher = SluiceClient(settings)
        query = open_query(settings)
        self.batches = BatchService(settings, open_file_store(settings), self.publisher, query)
        models = [m.name for m in load_catalog(settings.catalog_path)]
        self.quota: QuotaLedger | None = None
        self._ledger_reader: TopicReader | None = None
        if ledger_wanted(settings):
            self.quota = QuotaLedger(settings.tenants.token_quotas)
            self._ledger_reader = load_ledger(settings, clients.serde(settings), self.quota)
        self.capacity = Capacity(settings, models)
        self.waiter = ResultWaiter(settings, clients.serde(settings), on_result=self.capacity.finished)
        self.services = Services(
            settings=settings,
            keys=KeyStore(keys_path(settings)),
            files=self.batches.files,
            batches=self.batches,
            publisher=self.publisher,
            lookups=self.batches.lookups,
            waiter=self.waiter,
            capacity=self.capacity,
            models=models,
            quota=self.quota,
        )
        self.app = create_api(self.services)
        self.webhooks = WebhookWorker(settings)
        self.fanout = ResultFanout(settings)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start_workers(self) -> None:
        workers = [
            ("batches", self.batches.run),
            ("webhooks", self.webhooks.run),
            ("results", self.waiter.run),
            ("capacity", self.capacity.run),
        ]
        if self.quota is not None and self._ledger_reader is not None:
            reader, quota, serde = self._ledger_reader, self.quota, clients.serde(self.settings)
            workers.append(("quota", lambda stop: follow_ledger(reader, serde, quota, stop)))
        if self.fanout.needed:
            workers.append(("fanout", self.fanout.run))
        for name, target in workers:
            t = threading.Thread(target=self._keep_running, args=(name, target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        # A synchronous call registers before it publishes; the reader must be at the end first.
        self.waiter.ready.wait(30)

    def _keep_running(self, name: str, target: Callable[[threading.Event], None]) -> None:
        """A worker that fails is logged and started again: a dead thread would silently stop
        webhooks or the fan-out while the gateway still answers."""
        while not self._stop.is_set():
            try:
                target(self._stop)
            except Exception:
                logger.exception("gateway worker %s failed; restarting in 5 s", name)
                self._stop.wait(5)

    def stop_workers(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        self.publisher.flush()

    def serve(self, host: str | None = None, port: int | None = None) -> None:
        import uvicorn

        # Registered by the serving process only (a registry takes each metric name once).
        register_collector(lambda: capacity_gauges(self.capacity, lambda: self.waiter.waiting))
        self.start_workers()
        try:
            uvicorn.run(
                self.app,
                host=host or self.settings.gateway.host,
                port=port if port is not None else self.settings.gateway.port,
                log_level="warning",
                timeout_graceful_shutdown=10,
            )
        finally:
            self.stop_workers()
