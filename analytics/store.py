"""ClickHouse access through clickhouse-connect: ``chdb://<dir>`` embedded or ``http(s)://`` server.

chDB is synchronous and allows one process per data directory, so a Store serializes its calls
with a lock and is owned by one process (the stack's sink); other processes query through the
owner's query endpoint (``analytics.query_server``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from analytics.ddl import ddl_statements
from sluice.errors import StoreError
from sluice.settings import Settings

__all__ = ["QueryResult", "ReadOnlyViolation", "Store", "check_read_only"]

logger = logging.getLogger(__name__)


class ReadOnlyViolation(StoreError):
    """A statement the query path refuses: not a read, or a table function reaching outside."""


_READ = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)
# Table functions that read or write files, the network or other databases.
_TABLE_FUNCTIONS = re.compile(
    r"\b(file|fileCluster|url|urlCluster|s3|s3Cluster|gcs|azureBlobStorage|azureBlobStorageCluster|hdfs|hdfsCluster|"
    r"remote|remoteSecure|cluster|clusterAllReplicas|mysql|postgresql|mongodb|redis|sqlite|jdbc|odbc|executable|"
    r"input|iceberg|icebergS3|deltaLake|hudi|dictionary)\s*\(",
    re.IGNORECASE,
)


def check_read_only(sql: str) -> None:
    if not _READ.match(sql):
        raise ReadOnlyViolation("only SELECT, WITH, SHOW, DESCRIBE, EXPLAIN and EXISTS are allowed (read-only)")
    found = _TABLE_FUNCTIONS.search(sql)
    if found:
        raise ReadOnlyViolation(f"table function {found.group(1)}() is not allowed (read-only)")


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


class Store:
    def __init__(self, url: str, database: str = "sluice", username: str = "default", password: str = "") -> None:
        import clickhouse_connect

        self.url = url
        self.database = database
        self._lock = threading.Lock()
        try:
            if url.startswith("chdb://"):
                path = url.removeprefix("chdb://")
                if path != "memory":
                    Path(path).mkdir(parents=True, exist_ok=True)
                self._client = clickhouse_connect.get_client(dsn=url)
            else:
                u = urlparse(url)
                self._client = clickhouse_connect.get_client(
                    host=u.hostname or "localhost",
                    port=u.port or (8443 if u.scheme == "https" else 8123),
                    secure=u.scheme == "https",
                    username=u.username or username,
                    password=u.password or password,
                )
        except Exception as exc:
            raise StoreError(f"cannot open ClickHouse at {url}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store the settings name: ``SLUICE_CLICKHOUSE__URL``, or the embedded chDB directory."""
        ch = settings.clickhouse
        return cls(settings.clickhouse_url(), ch.database, ch.username, ch.password)

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb://")

    def ensure_schema(self) -> None:
        for stmt in ddl_statements(self.database):
            self.command(stmt)

    def command(self, sql: str) -> None:
        with self._lock:
            try:
                self._client.command(sql)
            except Exception as exc:
                raise StoreError(f"ClickHouse refused: {exc}") from exc

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                self._client.insert(table, list(rows), column_names=list(columns), database=self.database)
            except Exception as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A read-only query: ClickHouse's ``readonly=1`` refuses writes, DDL, setting changes and
        table functions (``file()``, ``url()``, ``s3()``…); the statement check says why first.
        Writers (the sink, the schema) use :meth:`insert` and :meth:`command`."""
        check_read_only(sql)
        with self._lock:
            try:
                res = self._client.query(sql, parameters=parameters or {}, settings={"readonly": 1})
            except Exception as exc:
                raise StoreError(f"query failed: {exc}") from exc
        return QueryResult(list(res.column_names), [list(r) for r in res.result_rows])

    def close(self) -> None:
        with self._lock:
            self._client.close()
