"""The foundation every stage shares: settings, errors, topics, the model catalog, the Kafka client
factory and runtime (``core.kafka``), the engine registry, logs and metrics.

It imports only ``schemas``; everything else imports it (the layers contract in pyproject.toml).
"""

__all__: list[str] = []
