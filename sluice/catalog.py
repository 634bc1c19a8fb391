"""The model catalog: which models exist, their topics, capability tiers and prices."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, model_validator

from sluice.errors import CatalogError

__all__ = ["Catalog", "ModelEntry", "load_catalog", "write_catalog"]


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

    def by_cost(self) -> list[ModelEntry]:
        """Cheapest first (output price dominates generation cost, input breaks ties)."""
        return sorted(self.models, key=lambda m: (m.output_price_per_1m, m.input_price_per_1m, m.name))

    def most_capable(self) -> ModelEntry:
        return max(self.models, key=lambda m: (m.tier, m.context_length, m.output_price_per_1m))


def load_catalog(path: Path | None = None) -> Catalog:
    """Load a TOML catalog; ``None`` means the packaged default catalog."""
    try:
        if path is None:
            text = resources.files("sluice").joinpath("data/catalog.toml").read_text()
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
        for key, value in m.model_dump(exclude_none=True).items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
