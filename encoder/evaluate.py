"""Quality metrics of an encoder against full precision: `python -m encoder.evaluate SPEC`.

Metrics (exact search, cosine on L2-normalized embeddings):
- stsb:       STS-B dev Spearman of cosine vs gold score (never the test split);
- scifact:    SciFact test nDCG@10 and recall@100 (corpus text = title + abstract);
- catalog:    neighbour recall@10 of the model's 10 nearest books against full precision's over all
              10,000 catalog items (item text = title, authors, top tags, as the recommender embeds
              them), overall and separately for the held-out and the training items (encoder/data.py);
              plus the mean cosine between the model's and full precision's item vectors;
- catalog_ta: the same on "title by authors" strings;
- rec:        leave-one-out on goodbooks `to_read` (fixed seed, users with >= 5 books): hold out one
              book, user vector = mean of the other books' embeddings, rank every book the user has not
              seen; HitRate@10 with its standard error, and NDCG@10.
`evaluate_encoder` runs on any encoder (`.encode(texts, batch_size) -> normalized float32`, `.dim`,
`.name`), in memory or loaded; embeddings are cached (encoder/embedding_cache.py) when a content-derived
model key is given. The report over several models (FP, int8 peers, ternary) is `python -m bench.quality`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from encoder.data import catalog_texts, default_data_dir, heldout_mask, read_scifact, read_stsb, read_to_read
from encoder.embedding_cache import encode_cached, model_fingerprint
from encoder.neighbours import top_k

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALL_TASKS = ("stsb", "scifact", "catalog", "catalog_ta", "rec")
CHEAP_TASKS = ("stsb", "catalog", "catalog_ta")  # what a training run checks (SciFact costs minutes)
REC_SEED = 0
K = 10


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def neighbour_overlap(emb: np.ndarray, ref: np.ndarray, k: int = K) -> np.ndarray:
    """Per item: the share of its k nearest items under `ref` that are among its k nearest under `emb`."""
    a, b = top_k(emb, emb, k, exclude_self=True), top_k(ref, ref, k, exclude_self=True)
    return np.fromiter((len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)), dtype=np.float64,
                       count=len(a))


def neighbour_recall(emb: np.ndarray, ref: np.ndarray, k: int = K) -> float:
    return float(neighbour_overlap(emb, ref, k).mean())


def eval_stsb(encode, data: Path) -> dict:
    s1, s2, gold = read_stsb(data, "dev")
    uniq = sorted(set(s1) | set(s2))
    emb = encode(uniq)
    index = {s: i for i, s in enumerate(uniq)}
    cos = np.sum(emb[[index[s] for s in s1]] * emb[[index[s] for s in s2]], axis=1)
    return {"stsb_dev_spearman": spearman(cos, gold)}


def eval_scifact(encode, data: Path) -> dict:
    doc_ids, docs, qids, queries, qrels = read_scifact(data)
    d, q = encode(docs), encode(queries)
    top = top_k(q, d, 100)
    ndcgs, recalls = [], []
    for qi, qid in enumerate(qids):
        rel = qrels[qid]
        ranked = [doc_ids[j] for j in top[qi]]
        dcg = sum(1.0 / math.log2(r + 2) for r, doc in enumerate(ranked[:10]) if doc in rel)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), 10)))
        ndcgs.append(dcg / idcg)
        recalls.append(len(set(ranked) & rel) / len(rel))
    return {"scifact_ndcg@10": float(np.mean(ndcgs)), "scifact_recall@100": float(np.mean(recalls)),
            "scifact_queries": len(qids)}


def eval_neighbours(emb: np.ndarray, ref: np.ndarray, heldout: np.ndarray, prefix: str) -> dict:
    """Neighbour recall@10 against the reference, overall / held-out items / training items."""
    overlap = neighbour_overlap(emb, ref)
    return {f"{prefix}_neighbour_recall@10": float(overlap.mean()),
            f"{prefix}_neighbour_recall@10_heldout": float(overlap[heldout].mean()),
            f"{prefix}_neighbour_recall@10_train": float(overlap[~heldout].mean()),
            f"{prefix}_mean_cosine_to_fp": float(np.mean(np.sum(emb * ref, axis=1)))}


def recommend_loo(emb: np.ndarray, item_ids: list[str], users: dict[str, list[str]], seed: int = REC_SEED) -> dict:
    """Leave-one-out HitRate@10 (and its binomial standard error) / NDCG@10 over every user with >= 5
    catalog books; the same held-out book per user for every model (seeded)."""
    pos = {item: i for i, item in enumerate(item_ids)}
    eligible = sorted(u for u, books in users.items() if len({b for b in books if b in pos}) >= 5)
    rng = np.random.default_rng(seed)
    seen = [np.asarray(sorted({pos[b] for b in users[u] if b in pos})) for u in eligible]
    held = np.asarray([s[rng.integers(len(s))] for s in seen])
    ranks = []
    for start in range(0, len(eligible), 512):
        chunk = range(start, min(start + 512, len(eligible)))
        profiles = np.stack([emb[seen[i][seen[i] != held[i]]].mean(axis=0) for i in chunk])
        profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
        scores = profiles @ emb.T
        for row, i in enumerate(chunk):  # the user's other books are not candidates
            scores[row, seen[i][seen[i] != held[i]]] = -np.inf
        target = scores[np.arange(len(chunk)), held[list(chunk)]]
        ranks.append(np.sum(scores > target[:, None], axis=1))
    rank = np.concatenate(ranks)
    hit = float(np.mean(rank < K))
    ndcg = np.where(rank < K, 1.0 / np.log2(rank + 2.0), 0.0)
    return {"rec_hitrate@10": hit, "rec_hitrate@10_se": math.sqrt(hit * (1 - hit) / len(rank)),
            "rec_ndcg@10": float(np.mean(ndcg)), "rec_users": len(rank)}


def evaluate_encoder(encoder, reference=None, tasks=ALL_TASKS, data: Path | None = None,
                     model_key: str | None = None, reference_key: str | None = None) -> dict:
    """All metrics of `encoder`; `reference` = the full-precision encoder the catalog metrics compare
    against (default: the encoder itself). `model_key` / `reference_key`: content-derived cache keys
    (encoder/embedding_cache.py); None = encode every time (a model in training)."""
    data = Path(data) if data else default_data_dir()
    result: dict = {"name": str(encoder.name)}
    t0 = time.perf_counter()

    def encode(texts):
        return encode_cached(encoder, texts, model_key)

    def encode_ref(texts):
        if reference is None:
            return encode(texts)
        return encode_cached(reference, texts, reference_key)

    if "stsb" in tasks:
        result.update(eval_stsb(encode, data))
    if "scifact" in tasks:
        result.update(eval_scifact(encode, data))
    item_ids, texts, short = catalog_texts()
    heldout = heldout_mask(item_ids)
    if "catalog" in tasks or "rec" in tasks:
        emb = encode(texts)
        if "catalog" in tasks:
            result.update(eval_neighbours(emb, encode_ref(texts), heldout, "catalog"))
        if "rec" in tasks:
            result.update(recommend_loo(emb, item_ids, read_to_read()))
    if "catalog_ta" in tasks:
        result.update(eval_neighbours(encode(short), encode_ref(short), heldout, "catalog_title_authors"))
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def full_precision(base: str = ""):
    """(the full-precision encoder, its cache key)."""
    from encoder.base_model import default_base_model
    from encoder.loading import load_encoder

    base = base or default_base_model()
    fp = load_encoder(base)
    fp.name = "full precision"
    return fp, "sentence-transformers:" + model_fingerprint(base)


def main() -> None:
    from encoder.loading import load_encoder
    from encoder.ternary_format import is_ternary_dir

    parser = argparse.ArgumentParser(description="Quality metrics of one encoder against full precision "
                                                 "(the multi-model report is `python -m bench.quality`).")
    parser.add_argument("spec", help="any load_encoder spec: a packed ternary directory or a "
                                     "sentence-transformers model")
    parser.add_argument("--base", default="", help="full-precision reference (default: the bundled MiniLM)")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--data", type=Path, default=None, help="shared data directory (default: "
                        "$TERNREC_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = parser.parse_args()
    fp, fp_key = full_precision(args.base)
    enc = load_encoder(args.spec)
    kind = "ternary" if is_ternary_dir(Path(args.spec)) else "sentence-transformers"
    key = f"{kind}:{getattr(enc, 'backend', '')}:" + model_fingerprint(args.spec) if Path(args.spec).exists() \
        else None
    result = evaluate_encoder(enc, fp, tuple(t for t in args.tasks.split(",") if t), args.data, key, fp_key)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
