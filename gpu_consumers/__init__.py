"""Stage 4: consumer groups that batch-consume a model topic into an inference engine."""

from gpu_consumers.engine import Engine, EngineOutput, EngineRequest

__all__ = ["Engine", "EngineOutput", "EngineRequest"]
