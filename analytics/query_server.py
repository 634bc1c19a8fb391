"""A loopback HTTP endpoint through which other processes query the stack's ClickHouse.

An embedded chDB directory can be opened by one process only, so the process that owns it
(``sluice up`` / ``sluice demo``) serves ``POST /query`` (JSON ``{"sql", "parameters"}``) and
Prometheus ``GET /metrics``; ``sluice sql`` and ``sluice stats`` find it via
``<data_dir>/stack.json``. Queries are read-only (``Store.query``) and need the token the server
writes to ``<data_dir>/query.token`` (mode 0600) as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from analytics.store import Store
from core.errors import SluiceError

__all__ = ["QueryServer", "to_jsonable", "token_path", "write_token"]


def token_path(data_dir: Path) -> Path:
    return data_dir / "query.token"


def write_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


logger = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class QueryServer:
    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0, token_path: Path | None = None) -> None:
        self.store = store
        # Every query carries this token; it is written (mode 0600) where the tools look for it.
        self.token = secrets.token_urlsafe(32)
        self.token_path = token_path
        if token_path is not None:
            write_token(token_path, self.token)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug(fmt, *args)

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path == "/health":
                    self._send(200, b'{"ok": true}')
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                if self.path != "/query":
                    self._send(404, b'{"error": "not found"}')
                    return
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), server.token):
                    self._send(401, b'{"error": "missing or wrong token (see query.token beside stack.json)"}')
                    return
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(length) or b"{}")
                    res = server.store.query(str(body["sql"]), body.get("parameters") or {})
                    out = {"columns": res.columns, "rows": res.rows}
                    self._send(200, json.dumps(out, default=to_jsonable).encode())
                except (SluiceError, KeyError, ValueError) as exc:
                    self._send(400, json.dumps({"error": str(exc)}).encode())

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="query-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> QueryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
