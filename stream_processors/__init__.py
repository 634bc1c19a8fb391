"""Stage 3: Faust stream processors that validate, dedupe, classify and route requests."""

from stream_processors.pipeline import RequestPipeline

__all__ = ["RequestPipeline"]
