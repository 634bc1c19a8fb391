"""Stage 5: results and analytics: the ClickHouse sink and its DDL (``sink``, ``ddl``), the
store (``store``), the query endpoint for other processes (``query_server``), and the SQL behind
``sluice sql`` and ``sluice stats`` (``query``)."""

__all__: list[str] = []
