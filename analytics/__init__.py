"""Stage 5: results and analytics. The ClickHouse sink and its DDL (``sink``, ``ddl``), the store
(``store``), the query endpoint for other processes (``query_server``), the SQL behind ``sluice
sql``/``stats``/``status`` (``query``), the dead-letter workflow (``dlq``) and result rendering
and following (``results``)."""

__all__: list[str] = []
