"""Sluice: asynchronous LLM inference on Kafka.

Data flow: ``schemas`` -> ``producers`` -> ``stream_processors`` -> ``gpu_consumers`` ->
results/analytics (``sluice.analytics``). This package holds the shared runtime glue:
settings, errors, the model catalog, topic names, the embedded local stack and the CLI.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
