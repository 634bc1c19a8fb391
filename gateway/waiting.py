"""Results awaited by synchronous HTTP calls (``/v1/chat/completions``, ``/v1/responses``).

One thread per gateway reads the results topic from its end (every partition, no consumer group:
each gateway replica sees every result) and hands each awaited result to the coroutine waiting
for it. A call registers its request id *before* the request is published, so its result cannot
pass unseen. Every engine result also feeds the throughput the capacity estimate divides by.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from core import clients
from core.errors import SluiceError
from core.kafka import TopicReader
from core.settings import Settings
from core.topics import Topics
from schemas import InferenceResult, Serde

__all__ = ["ResultWaiter"]

logger = logging.getLogger(__name__)


class ResultWaiter:
    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        *,
        on_result: Callable[[InferenceResult], None] | None = None,
        consumer: Any | None = None,
    ) -> None:
        """``on_result``: sees every result read (the capacity estimate counts them);
        ``consumer``: the stub broker's in tests."""
        self.settings = settings
        self.serde = serde
        self.on_result = on_result
        self._consumer = consumer
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[InferenceResult]]] = {}
        self.ready = threading.Event()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def expect(self, request_id: str) -> asyncio.Future[InferenceResult]:
        """A future for ``request_id``'s result; call it before the request is published."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResult] = loop.create_future()
        with self._lock:
            self._waiting[request_id] = (loop, future)
        return future

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._waiting.pop(request_id, None)

    def deliver(self, result: InferenceResult) -> bool:
        """Hand ``result`` to its waiting call, if any (from any thread)."""
        if self.on_result is not None:
            self.on_result(result)
        with self._lock:
            entry = self._waiting.pop(result.request_id, None)
        if entry is None:
            return False
        loop, future = entry

        def settle() -> None:
            if not future.done():
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the waiting call's loop has closed: nobody to tell
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        consumer = self._consumer or clients.consumer(
            self.settings.kafka, "results-waiter", f"{self.settings.topic_prefix}waiter-{uuid.uuid4().hex[:8]}"
        )
        reader = TopicReader(consumer, [Topics(self.settings.topic_prefix).results], from_end=True)
        self.ready.set()
        try:
            while not stop.is_set():
                for msg in reader.take(wait=0.2):
                    try:
                        self.deliver(self.serde.decode(InferenceResult, msg.value()))
                    except SluiceError as exc:
                        logger.error("skipped an undecodable result: %s", exc)
        finally:
            self.ready.clear()
            reader.close()
