"""Quality of an encoder against full precision: `python -m encoder.evaluate`.

Metrics (all with exact search, cosine on L2-normalized embeddings):
- stsb:    STS-B dev Spearman of cosine vs gold score (path from --stsb, never the test split);
- scifact: SciFact test nDCG@10 and recall@100 (corpus text = title + abstract);
- catalog: neighbour recall@10 of the model's 10 nearest books against full precision's, over all
           10,000 catalog items (item text = title, authors, top tags, as the recommender embeds
           them) and, for comparison with issue 4's table, over "title by authors" strings;
           plus the mean cosine between the model's and full precision's item vectors;
- rec:     leave-one-out on goodbooks `to_read` (fixed seed, users with >= 5 books): hold out one
           book, user vector = mean of the other books' embeddings, rank every book the user has not
           seen; HitRate@10 and NDCG@10.
Full-precision embeddings are cached under runs/eval_cache (.npy, keyed by model and texts), so
re-runs only encode the ternary models. Callable from Python on any in-memory encoder
(`.encode(texts, batch_size) -> normalized float32`, `.dim`, `.name`): see `evaluate_encoder`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STSB = (REPO_ROOT / ".." / "shared" / "data" / "stsbenchmark").resolve()
DEFAULT_SCIFACT = (REPO_ROOT / ".." / "shared" / "data" / "scifact").resolve()
CACHE_DIR = REPO_ROOT / "runs" / "eval_cache"
ALL_TASKS = ("stsb", "scifact", "catalog", "catalog_ta", "rec")
REC_USERS = None  # None = every user with >= 5 catalog books
SEED = 0


# ----------------------------------------------------------------------------- data

def read_stsb(path: Path, split: str = "dev") -> tuple[list[str], list[str], np.ndarray]:
    """(sentence1s, sentence2s, scores); tab-separated, no quoting, first 7 fields kept."""
    s1, s2, scores = [], [], []
    with open(path / f"sts-{split}.csv", encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                continue
            scores.append(float(fields[4]))
            s1.append(fields[5])
            s2.append(fields[6])
    return s1, s2, np.asarray(scores, dtype=np.float64)


def read_scifact(path: Path) -> tuple[list[str], list[str], list[str], list[str], dict[str, set[str]]]:
    """(doc_ids, doc_texts, test query ids, test query texts, qrels query -> relevant doc ids)."""
    doc_ids, docs = [], []
    with open(path / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            doc_ids.append(str(d["_id"]))
            docs.append((d.get("title", "") + " " + d.get("text", "")).strip())
    qrels: dict[str, set[str]] = {}
    with open(path / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, score = line.rstrip("\n").split("\t")[:3]
            if int(score) > 0:
                qrels.setdefault(q, set()).add(d)
    queries = {}
    with open(path / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qids = [q for q in qrels if q in queries]
    return doc_ids, docs, qids, [queries[q] for q in qids], qrels


@lru_cache(maxsize=1)
def catalog_texts() -> tuple[list[str], list[str], list[str]]:
    """(item ids, item texts as embedded by the recommender, "title by authors" strings)."""
    from ingest.catalog import load_items

    items = load_items()
    return ([i.item_id for i in items], [i.text for i in items],
            [f"{i.title} by {i.authors}" for i in items])


def read_to_read() -> dict[str, list[str]]:
    from ingest.catalog import load_interactions

    pairs = load_interactions()
    return {u: list(g) for u, g in pairs.groupby("user_id", sort=True)["item_id"]}


# ----------------------------------------------------------------------------- encoding + cache

class ModelEncoder:
    """An in-memory sentence-transformers model (e.g. a ternarized student) as an Encoder."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self.dim = int(model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import torch

        self.model.eval()
        with torch.inference_mode():
            emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32).reshape(len(texts), self.dim)


def encode_cached(encoder, texts: list[str], tag: str, cache: bool) -> np.ndarray:
    """Encodes texts; with cache=True, reuses runs/eval_cache/<model>-<tag>-<hash>.npy."""
    if not cache:
        return encoder.encode(texts, batch_size=64)
    key = hashlib.sha256(("\n".join(texts) + "\x00" + str(encoder.name)).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"{Path(str(encoder.name)).name}-{tag}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    emb = encoder.encode(texts, batch_size=64)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, emb, allow_pickle=False)
    return emb


# ----------------------------------------------------------------------------- metrics

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Exact top-k indices by inner product, in chunks so a 10k x 10k matrix never lives at once."""
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


def neighbour_recall(emb: np.ndarray, ref: np.ndarray, k: int = 10) -> float:
    a, b = top_k(emb, emb, k, exclude_self=True), top_k(ref, ref, k, exclude_self=True)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def eval_stsb(encoder, path: Path, cache: bool) -> dict:
    s1, s2, gold = read_stsb(path, "dev")
    uniq = sorted(set(s1) | set(s2))
    emb = encode_cached(encoder, uniq, "stsb-dev", cache)
    index = {s: i for i, s in enumerate(uniq)}
    cos = np.sum(emb[[index[s] for s in s1]] * emb[[index[s] for s in s2]], axis=1)
    return {"stsb_dev_spearman": spearman(cos, gold)}


def eval_scifact(encoder, path: Path, cache: bool) -> dict:
    doc_ids, docs, qids, queries, qrels = read_scifact(path)
    d = encode_cached(encoder, docs, "scifact-corpus", cache)
    q = encode_cached(encoder, queries, "scifact-test-queries", cache)
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


def recommend_loo(emb: np.ndarray, item_ids: list[str], users: dict[str, list[str]],
                  n_users: int | None = REC_USERS, seed: int = SEED) -> dict:
    """Leave-one-out HitRate@10 / NDCG@10; same users and held-out books for every model (seeded)."""
    pos = {item: i for i, item in enumerate(item_ids)}
    eligible = sorted(u for u, books in users.items() if len({b for b in books if b in pos}) >= 5)
    rng = np.random.default_rng(seed)
    if n_users is not None and n_users < len(eligible):
        eligible = [eligible[i] for i in sorted(rng.choice(len(eligible), size=n_users, replace=False))]
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
    ndcg = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
    return {"rec_hitrate@10": float(np.mean(rank < 10)), "rec_ndcg@10": float(np.mean(ndcg)),
            "rec_users": len(rank)}


def evaluate_encoder(encoder, reference=None, tasks=ALL_TASKS, stsb_path: Path = DEFAULT_STSB,
                     scifact_path: Path = DEFAULT_SCIFACT, cache: bool = False) -> dict:
    """All metrics of `encoder`; `reference` (the full-precision encoder, cached) for the catalog
    comparison. `cache` caches this encoder's own embeddings (use it for fixed models only)."""
    result: dict = {"name": str(encoder.name)}
    t0 = time.perf_counter()
    if "stsb" in tasks:
        result.update(eval_stsb(encoder, stsb_path, cache))
    if "scifact" in tasks:
        result.update(eval_scifact(encoder, scifact_path, cache))
    ref_enc = reference or encoder
    if "catalog" in tasks or "rec" in tasks:
        item_ids, texts, short = catalog_texts()
        emb = encode_cached(encoder, texts, "catalog", cache)
        if "catalog" in tasks:
            ref = encode_cached(ref_enc, texts, "catalog", True)
            result["catalog_neighbour_recall@10"] = neighbour_recall(emb, ref)
            result["catalog_mean_cosine_to_fp"] = float(np.mean(np.sum(emb * ref, axis=1)))
        if "rec" in tasks:
            result.update(recommend_loo(emb, item_ids, read_to_read()))
    if "catalog_ta" in tasks:  # issue 4's table: "title by authors" strings
        _, _, short = catalog_texts()
        emb_short = encode_cached(encoder, short, "catalog-title-authors", cache)
        ref_short = encode_cached(ref_enc, short, "catalog-title-authors", True)
        result["catalog_title_authors_neighbour_recall@10"] = neighbour_recall(emb_short, ref_short)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def scheme_weight_errors(base: str) -> dict[str, dict[str, float]]:
    """Per ternary scheme: ||W - W_hat||^2 / ||W||^2 over all transformer Linears, and the zero share."""
    from safetensors.torch import load_file

    from encoder.ternary import SCHEMES, ternarize_weight

    weights = [w.float() for k, w in load_file(str(Path(base) / "model.safetensors")).items()
               if k.endswith(".weight") and w.dim() == 2 and "embeddings" not in k]
    out = {}
    for scheme in SCHEMES:
        err = norm = zeros = total = 0.0
        for w in weights:
            q, s = ternarize_weight(w, scheme)
            err += float(((w - s[:, None] * q) ** 2).sum())
            norm += float((w ** 2).sum())
            zeros, total = zeros + float((q == 0).sum()), total + q.numel()
        out[scheme] = {"relative_weight_error": err / norm, "zero_fraction": zeros / total,
                       "linears": len(weights)}
    return out


# ----------------------------------------------------------------------------- report

ROWS = [("stsb_dev_spearman", "STS-B dev Spearman"), ("scifact_ndcg@10", "SciFact nDCG@10"),
        ("scifact_recall@100", "SciFact recall@100"),
        ("catalog_neighbour_recall@10", "catalog neighbour recall@10 vs FP (item text)"),
        ("catalog_title_authors_neighbour_recall@10", "catalog neighbour recall@10 vs FP (title + authors)"),
        ("catalog_mean_cosine_to_fp", "catalog mean cosine to FP"),
        ("rec_hitrate@10", "to_read leave-one-out HitRate@10"),
        ("rec_ndcg@10", "to_read leave-one-out NDCG@10")]


def markdown(report: dict) -> str:
    models = report["models"]
    names = list(models)
    fp = models[names[0]]
    lines = ["## Quality", "",
             "Generated by `python -m encoder.evaluate` (also in `reports/quality.json`). Exact search, "
             "cosine similarity. Percentages are of full precision.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in ROWS:
        cells = []
        for n in names:
            v = models[n].get(key)
            if v is None:
                cells.append("–")
            elif n == names[0] or key.startswith("catalog") or not fp.get(key):
                cells.append(f"{v:.4f}")
            else:
                cells.append(f"{v:.4f} ({100 * v / fp[key]:.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Models: " + "; ".join(f"**{n}** = `{models[n]['spec']}`" for n in names) + ".",
              f"Leave-one-out: {fp.get('rec_users', '?')} users with ≥ 5 books (seed {SEED}); "
              f"SciFact: {fp.get('scifact_queries', '?')} test queries, 5,183 abstracts."]
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    schemes = report.get("scheme_weight_errors") or {}
    if schemes:
        lines += ["", "### Ternary schemes, before training (weight space)", "",
                  "| scheme | relative weight error ‖W − Ŵ‖²/‖W‖² | share of zero codes |", "|---|---|---|"]
        lines += [f"| {k} | {v['relative_weight_error']:.4f} | {v['zero_fraction']:.3f} |"
                  for k, v in schemes.items()]
    ablations = report.get("ablations") or []
    if ablations:
        lines += ["", "### Distillation ablations (short runs)", "",
                  "| run | scheme | steps | minutes | STS-B | neighbour R@10 | mean cos to FP "
                  "| HitRate@10 | notes |", "|---|---|---|---|---|---|---|---|---|"]
        for a in ablations:
            def f(k, a=a):
                return f"{a[k]:.4f}" if isinstance(a.get(k), float) else "–"
            lines.append(f"| {a.get('run')} | {a.get('scheme')} | {a.get('steps')} | {a.get('minutes')} | "
                         f"{f('stsb_dev_spearman')} | {f('catalog_neighbour_recall@10')} | "
                         f"{f('catalog_mean_cosine_to_fp')} | {f('rec_hitrate@10')} | "
                         f"{a.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def write_markdown_section(section: str, path: Path) -> None:
    """Replaces the `## Quality` section of BENCHMARKS.md (up to the next `## `), keeping the rest."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "## Quality"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.write_text(text)


def build_model(label: str, base: str, fp, ternary_dir: str):
    """(encoder, spec, cache its embeddings?) for one row of the report."""
    from encoder.loading import load_encoder

    if label == "full precision":
        return fp, base, True
    if label == "ternary distilled":
        distilled = load_encoder(ternary_dir)
        weights = Path(ternary_dir) / "model.safetensors"
        if weights.is_file():  # cache keyed by the weights' content, so a retrained model is re-encoded
            distilled.name = "ternary-distilled:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
        return distilled, ternary_dir, weights.is_file()
    from sentence_transformers import SentenceTransformer

    from encoder.ternary import ternarize_model

    scheme = label.removeprefix("ternary ").removesuffix(", no distillation")
    calibrate = scheme.endswith("+cal")  # e.g. "row_opt+learn+cal": activation-aware fit
    student = ternarize_model(SentenceTransformer(base, device="cpu"), scheme.removesuffix("+cal"))
    if calibrate:
        from encoder.distill import calibrate_student, calibration_texts

        calibrate_student(student, calibration_texts(256))
    return ModelEncoder(student, f"ternary-{scheme}-untrained:" + Path(base).name), f"{base} + {scheme}", True


def main() -> None:
    from encoder.loading import default_base_model, load_encoder

    parser = argparse.ArgumentParser(description="Quality of full precision vs ternary encoders.")
    parser.add_argument("--base", default="", help="full-precision model (default: the bundled MiniLM)")
    parser.add_argument("--ternary", default=str(REPO_ROOT / "models" / "ternary-minilm"),
                        help="distilled ternary model directory (any load_encoder spec)")
    parser.add_argument("--undistilled-scheme", default="paper,row_opt",
                        help="comma-separated ternary schemes to evaluate without distillation")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--stsb", type=Path, default=DEFAULT_STSB)
    parser.add_argument("--scifact", type=Path, default=DEFAULT_SCIFACT)
    parser.add_argument("--ablations", nargs="*", default=None,
                        help="runs/<name>/eval.json files to list as ablations (default: reports' list)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "quality.json")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--merge", nargs="*", default=None, help="no evaluation: merge the models of "
                        "these partial reports (written with --only / --tasks by parallel processes)")
    parser.add_argument("--note", action="append", default=[], help="a line to print under the table")
    parser.add_argument("--only", default="", help="evaluate only models whose label contains this "
                        "(fills the embedding cache; e.g. to split the work across processes)")
    args = parser.parse_args()

    import torch

    torch.manual_seed(SEED)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    base = args.base or default_base_model()
    report: dict = {"tasks": list(tasks), "models": {}, "scheme_weight_errors": scheme_weight_errors(base),
                    "notes": args.note}
    if args.merge is not None:
        report["tasks"] = []
        for part in args.merge:
            partial = json.loads(Path(part).read_text())
            report["tasks"] = sorted(set(report["tasks"]) | set(partial["tasks"]))
            for label, result in partial["models"].items():
                report["models"].setdefault(label, {}).update(result)
        order = ["full precision"] + [k for k in report["models"] if k != "full precision"]
        report["models"] = {k: report["models"][k] for k in order if k in report["models"]}
    else:
        fp = load_encoder(base)
        fp.name = "full-precision:" + Path(base).name  # stable cache key
        labels = ["full precision"] + [f"ternary {s}, no distillation"
                                       for s in args.undistilled_scheme.split(",") if s]
        labels += ["ternary distilled"] if args.ternary else []
        for label in labels:
            if args.only and args.only not in label and label != "full precision":
                continue
            enc, spec, cache = build_model(label, base, fp, args.ternary)
            print(f"evaluating {label} ...", flush=True)
            result = evaluate_encoder(enc, reference=fp, tasks=tasks, stsb_path=args.stsb,
                                      scifact_path=args.scifact, cache=cache)
            result["spec"] = str(spec)
            report["models"][label] = result
            print(json.dumps(result, indent=1), flush=True)

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.ablations is None:
        report["ablations"] = previous.get("ablations", [])
    else:
        report["ablations"] = [json.loads(Path(p).read_text()) for p in args.ablations]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown_section(markdown(report), args.markdown)
    print(f"wrote {args.out} and the Quality section of {args.markdown}")


if __name__ == "__main__":
    main()
