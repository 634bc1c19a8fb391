"""Local-development infrastructure: the embedded broker, the single-machine stack that
``sluice up`` and ``sluice demo`` run, the demo itself, and the tiny test model. Production
deployments run the stage packages against a real Kafka and ClickHouse and need none of this."""

__all__: list[str] = []
