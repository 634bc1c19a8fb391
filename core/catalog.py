"""The model catalog: which models exist, their topics, capability tiers and prices."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import CatalogError

__all__ = ["Catalog", "ModelEngineArgs", "ModelEntry", "load_catalog", "write_catalog"]


class ModelEngineArgs(BaseModel):
    """Per-model engine arguments (``[models.engine]``), named as vLLM's engine arguments.

    Unset values fall back to the GPU consumer's settings, then to vLLM's own defaults.
    """

    model_config = ConfigDict(extra="forbid")

    # Default: the entry's context_length, so the engine accepts whatever the router sends it.
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    dtype: str | None = None
    quantization: str | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    enable_prefix_caching: bool | None = None


class ModelEntry(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str
    tier: int = Field(ge=1)
    context_length: int = Field(gt=0)
    input_price_per_1m: float = Field(ge=0)
    output_price_per_1m: float = Field(ge=0)
    gpu_hour_price: float | None = Field(default=None, ge=0)
    available: bool = True
    max_backlog: int | None = Field(default=None, gt=0)
    engine: ModelEngineArgs = Field(default_factory=ModelEngineArgs)

    @property
    def engine_max_model_len(self) -> int:
        return self.engine.max_model_len or self.context_length

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_price_per_1m + output_tokens * self.output_price_per_1m) / 1_000_000


class Catalog(BaseModel):
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Catalog:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate model names in catalog: {sorted(names)}")
        return self

    def __iter__(self) -> Iterator[ModelEntry]:  # type: ignore[override]
        return iter(self.models)

    def get(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def most_capable(self) -> ModelEntry:
        return max(self.models, key=lambda m: (m.tier, m.context_length, m.output_price_per_1m))


def load_catalog(path: Path | None = None) -> Catalog:
    """Load a TOML catalog; ``None`` means the packaged default catalog."""
    try:
        if path is None:
            text = resources.files("core").joinpath("data/catalog.toml").read_text()
            where = "<packaged catalog>"
        else:
            text = Path(path).read_text()
            where = str(path)
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}") from exc
    try:
        return Catalog.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise CatalogError(f"invalid model catalog {where}: {exc}") from exc


def write_catalog(catalog: Catalog, path: Path) -> Path:
    """Write a catalog as TOML that :func:`load_catalog` reads back (for generated catalogs)."""
    lines: list[str] = []
    for m in catalog:
        lines.append("[[models]]")
        tables: dict[str, dict[str, object]] = {}
        for key, value in m.model_dump(exclude_none=True, exclude_defaults=True).items():
            if isinstance(value, dict):
                tables[key] = value
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        for key, table in tables.items():
            lines.append(f"[models.{key}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
