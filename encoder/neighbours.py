"""Exact nearest neighbours by inner product (cosine on L2-normalized rows), in chunks."""

from __future__ import annotations

import numpy as np


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Indices of each query's k best corpus rows, best first; `exclude_self` when queries == corpus.
    In chunks of 1024 queries so a 10k x 10k similarity matrix never lives at once."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 1024):
        sims = queries[start:start + 1024] @ corpus.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        idx = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, idx, axis=1), axis=1)
        out[start:start + 1024] = np.take_along_axis(idx, order, axis=1)
    return out
