"""A TLS listener in front of a plaintext broker: terminates TLS (mutual, when a CA for clients is
given) and forwards the bytes. The broker advertises the proxy's address, so every connection a
client makes after bootstrap goes through TLS as well."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

__all__ = ["TlsProxy"]


class TlsProxy:
    def __init__(self, port: int, upstream_port: int, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.port, self.upstream_port = port, upstream_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.handshakes = 0
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if isinstance(context.get("exception"), ssl.SSLError | ConnectionError):
            self.refused += 1  # a failed handshake: no certificate, an untrusted one, plaintext

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(self._exception)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.ctx))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def start(self) -> TlsProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
