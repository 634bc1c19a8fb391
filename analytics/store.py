"""ClickHouse access through clickhouse-connect: ``chdb://<dir>`` embedded or ``http(s)://`` server.

chDB is synchronous and allows one process per data directory, so a Store serializes its calls
with a lock and is owned by one process (the stack's sink); other processes query through the
owner's query endpoint (``analytics.query_server``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from analytics.ddl import (
    TABLES,
    TTL_COLUMNS,
    create_table,
    ddl_statements,
    sorting_key,
    ttl_statements,
    view_statements,
)
from core.errors import StoreError
from core.settings import Settings

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
    def __init__(
        self,
        url: str,
        database: str = "sluice",
        username: str = "default",
        password: str = "",
        *,
        text_ttl_days: int = 0,
    ) -> None:
        import clickhouse_connect

        self.url = url
        self.database = database
        self.text_ttl_days = text_ttl_days
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
        return cls(
            settings.clickhouse_url(),
            ch.database,
            ch.username,
            ch.password.get_secret_value(),
            text_ttl_days=ch.text_ttl_days,
        )

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb://")

    def ensure_schema(self) -> None:
        """Create what is missing, migrate tables of an earlier release to today's sorting keys,
        bring text TTLs to the setting, and (re)create the ``*_latest`` views."""
        for stmt in ddl_statements(self.database, self.text_ttl_days):
            self.command(stmt)
        self._migrate_sorting_keys()
        self._apply_ttl()
        for stmt in view_statements(self.database):
            self.command(stmt)

    def _tables(self) -> dict[str, tuple[str, str]]:
        rows = self.query(
            "SELECT name, sorting_key, create_table_query FROM system.tables WHERE database = {db:String}",
            {"db": self.database},
        ).rows
        return {r[0]: (r[1], r[2]) for r in rows}

    def _migrate_sorting_keys(self) -> None:
        # A sorting key cannot be altered: copy into a table with the new one, swap the names,
        # keep the old table as <name>__before_<time> for the operator to drop.
        db = self.database
        for table, (key, _) in self._tables().items():
            if table not in TABLES or key.replace(" ", "") == sorting_key(table).replace(" ", ""):
                continue
            new = f"{table}__migrating"
            stamp = time.strftime("%Y%m%d%H%M%S")
            logger.warning(
                "migrating %s.%s to sorting key (%s); the old table stays as %s__before_%s",
                db,
                table,
                sorting_key(table),
                table,
                stamp,
            )
            self.command(f"DROP TABLE IF EXISTS {db}.{new}")
            self.command(create_table(db, table, new, self.text_ttl_days))
            cols = self.query(
                "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
                "AND default_kind = '' AND name IN (SELECT name FROM system.columns "
                "WHERE database = {db:String} AND table = {n:String})",
                {"db": db, "t": new, "n": table},
            ).rows
            names = ", ".join(f"`{r[0]}`" for r in cols)
            self.command(f"INSERT INTO {db}.{new} ({names}) SELECT {names} FROM {db}.{table}")
            self.command(f"RENAME TABLE {db}.{table} TO {db}.{table}__before_{stamp}, {db}.{new} TO {db}.{table}")

    def _apply_ttl(self) -> None:
        tables = self._tables()
        wanted = self.text_ttl_days
        for table, cols in TTL_COLUMNS.items():
            create = tables.get(table, ("", ""))[1]
            for column, _ in cols:
                found = re.search(rf"`?{column}`? String[^,]*?TTL [^,]*?toIntervalDay\((\d+)\)", create)
                if (int(found.group(1)) if found else 0) != wanted:
                    for stmt in ttl_statements(self.database, wanted):
                        if f" {column} " in stmt and f"{table} " in stmt:
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
