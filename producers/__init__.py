"""Stage 2: publish inference requests to the Kafka topic of their priority."""

from producers.client import SluiceClient

__all__ = ["SluiceClient"]
