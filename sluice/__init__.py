"""Sluice: asynchronous LLM inference on Kafka.

Data flow: ``schemas`` -> ``producers`` -> ``stream_processors`` -> ``gpu_consumers`` ->
``analytics``. This package is the foundation the stages share (settings, errors, topics, the
catalog, the Kafka client factory, the engine registry, logs, metrics); ``sluice.local`` holds
the embedded single-machine stack and ``sluice.cli`` the command line.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
