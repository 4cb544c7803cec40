"""A feature-hashing bag-of-words encoder: `load_encoder("hashing:384")`.

No model, no torch: a deterministic, fast baseline. The pipeline's fault tests use it so that
killing and restarting workers many times stays cheap, and so that "the same text gives the same
vector" holds bit for bit.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_TOKEN = re.compile(r"\w+")


class HashingEncoder:
    def __init__(self, dim: int = 384):
        if dim < 1:
            raise ValueError(f"hashing encoder dimension must be positive, got {dim}")
        self.dim = dim
        self.name = f"hashing:{dim}"

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in _TOKEN.findall(text.lower()):
                h = zlib.crc32(token.encode())
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += (norms[:, 0] == 0)  # an empty text still gets a unit vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)
