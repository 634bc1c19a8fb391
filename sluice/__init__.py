"""Sluice: asynchronous LLM inference on Kafka.

Data flow: ``schemas`` -> ``producers`` -> ``stream_processors`` -> ``gpu_consumers`` ->
``analytics``, on the foundation in ``core``, with ``gateway`` (HTTP) above them. This package is
the composition root on top: ``sluice.local`` runs the embedded single-machine stack and
``sluice.cli`` the command line (``sluice`` / ``python -m sluice``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
