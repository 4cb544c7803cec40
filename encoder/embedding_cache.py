"""The one embedding cache: `.npy` files keyed by the model's content and the texts' content.

A key is sha256 over (model key, texts): the model key must itself come from content — the bytes of
the model's files (`model_fingerprint`) plus anything else that changes the output (a runtime, a
maximum length) — never from a name or a path, so a retrained or converted model is never served a
stale embedding. Directory: `$TERNREC_CACHE/embeddings` (default `~/.cache/ternrec/embeddings`).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec")) / "embeddings"


@lru_cache(maxsize=32)
def _fingerprint(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for f in files:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\x00")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:20]


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of every file of a model directory (or of one file), names included."""
    root = Path(path).resolve()
    if not root.exists():
        raise FileNotFoundError(f"model {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)  # re-hash on change
    return _fingerprint(str(root), stamp)


def text_key(model_key: str, texts: list[str]) -> str:
    h = hashlib.sha256(model_key.encode() + b"\x01")
    for t in texts:
        h.update(t.encode() + b"\x00")
    return h.hexdigest()[:24]


def encode_cached(encoder, texts: list[str], model_key: str | None, batch_size: int = 64) -> np.ndarray:
    """`encoder.encode(texts)`, reused from the cache when `model_key` (content-derived, see the module
    docstring) is given; `None` = no cache (a model in training)."""
    texts = list(texts)
    if model_key is None:
        return encoder.encode(texts, batch_size=batch_size)
    path = cache_dir() / f"{text_key(model_key, texts)}.npy"
    if path.is_file():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(texts):
            return emb
    emb = np.ascontiguousarray(encoder.encode(texts, batch_size=batch_size), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, path)  # never a half-written file under the final name
    return emb
