"""The text data distillation and evaluation read: one reader per dataset, and the catalog hold-out.

Paths: the shared data directory is a flag of every CLI (`--data`); its default is
`$TERNREC_DATA`, else `../shared/data` relative to the current directory (the repository root when
run as documented). STS Benchmark is read from there and never bundled.

The catalog hold-out (`catalog_heldout.json` beside this file, committed): a fixed 20% of the
bundled catalog's item ids that no training step, calibration, teacher neighbour list or loss bank
ever sees, so neighbour recall on them says how a book arriving in the stream is served.
Regenerate (only when the catalog changes): `python -m encoder.data heldout`.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

HELDOUT_FILE = Path(__file__).resolve().parent / "catalog_heldout.json"
HELDOUT_FRACTION = 0.2
HELDOUT_SEED = 0


def default_data_dir() -> Path:
    return Path(os.environ.get("TERNREC_DATA") or Path.cwd() / ".." / "shared" / "data").resolve()


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing (set --data or TERNREC_DATA to the shared data "
                                "directory holding stsbenchmark/, scifact/)")
    return path


def read_stsb(data: Path, split: str = "dev") -> tuple[list[str], list[str], np.ndarray]:
    """(sentence1s, sentence2s, scores) of `data/stsbenchmark/sts-{split}.csv`: tab-separated, no
    quoting, the first 7 fields kept (a few lines carry more)."""
    s1, s2, scores = [], [], []
    path = _require_file(Path(data) / "stsbenchmark" / f"sts-{split}.csv", f"STS Benchmark {split}")
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                continue
            scores.append(float(fields[4]))
            s1.append(fields[5])
            s2.append(fields[6])
    return s1, s2, np.asarray(scores, dtype=np.float64)


def read_scifact_corpus(data: Path) -> tuple[list[str], list[str], list[str]]:
    """(doc ids, titles, abstracts) of `data/scifact/corpus.jsonl`."""
    ids, titles, texts = [], [], []
    with open(_require_file(Path(data) / "scifact" / "corpus.jsonl", "SciFact corpus"), encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            ids.append(str(d["_id"]))
            titles.append(d.get("title", ""))
            texts.append(d.get("text", ""))
    return ids, titles, texts


def read_scifact(data: Path) -> tuple[list[str], list[str], list[str], list[str], dict[str, set[str]]]:
    """(doc ids, doc texts = title + abstract, test query ids, test query texts, qrels query -> relevant
    doc ids)."""
    doc_ids, titles, texts = read_scifact_corpus(data)
    docs = [(t + " " + x).strip() for t, x in zip(titles, texts, strict=True)]
    qrels: dict[str, set[str]] = {}
    with open(_require_file(Path(data) / "scifact" / "qrels" / "test.tsv", "SciFact test qrels"),
              encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, score = line.rstrip("\n").split("\t")[:3]
            if int(score) > 0:
                qrels.setdefault(q, set()).add(d)
    queries = {}
    with open(_require_file(Path(data) / "scifact" / "queries.jsonl", "SciFact queries"), encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qids = [q for q in qrels if q in queries]
    return doc_ids, docs, qids, [queries[q] for q in qids], qrels


@lru_cache(maxsize=1)
def catalog_texts() -> tuple[list[str], list[str], list[str]]:
    """(item ids, item texts as the recommender embeds them, "title by authors" strings), catalog order."""
    from ingest.catalog import load_items

    items = load_items()
    return ([i.item_id for i in items], [i.text for i in items], [f"{i.title} by {i.authors}" for i in items])


def read_to_read() -> dict[str, list[str]]:
    """user id -> the books on their to_read shelf (the bundled interactions)."""
    from ingest.catalog import load_interactions

    pairs = load_interactions()
    return {u: list(g) for u, g in pairs.groupby("user_id", sort=True)["item_id"]}


@lru_cache(maxsize=1)
def heldout_item_ids() -> frozenset[str]:
    if not HELDOUT_FILE.is_file():
        raise FileNotFoundError(f"{HELDOUT_FILE} is missing: run `python -m encoder.data heldout`")
    ids = json.loads(HELDOUT_FILE.read_text())["item_ids"]
    return frozenset(str(i) for i in ids)


def heldout_mask(item_ids: list[str]) -> np.ndarray:
    """Boolean per catalog position: True for a held-out item."""
    held = heldout_item_ids()
    return np.fromiter((i in held for i in item_ids), dtype=bool, count=len(item_ids))


def make_heldout(item_ids: list[str], fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    ordered = sorted(item_ids, key=int)
    pick = rng.choice(len(ordered), size=round(fraction * len(ordered)), replace=False)
    return sorted((ordered[i] for i in pick), key=int)


def training_texts(data: Path) -> dict[str, list[str]]:
    """The unlabelled training text by kind, held-out catalog items excluded:
    "item" (catalog item texts), "title_authors" ("title by authors" strings of the same books),
    "general" (STS-B train sentences, scores dropped, and SciFact titles and abstracts)."""
    ids, items, short = catalog_texts()
    keep = ~heldout_mask(ids)
    s1, s2, _ = read_stsb(data, "train")
    _, titles, abstracts = read_scifact_corpus(data)
    general = sorted(set(s1) | set(s2)) + [t for t in titles if t] + [a for a in abstracts if a]
    return {"item": [t for t, k in zip(items, keep, strict=True) if k],
            "title_authors": [t for t, k in zip(short, keep, strict=True) if k],
            "general": general}


def main() -> None:
    parser = argparse.ArgumentParser(description="Data tools: regenerate the committed catalog hold-out.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heldout", help=f"write {HELDOUT_FILE.name}")
    h.add_argument("--fraction", type=float, default=HELDOUT_FRACTION)
    h.add_argument("--seed", type=int, default=HELDOUT_SEED)
    args = parser.parse_args()
    ids, _, _ = catalog_texts()
    held = make_heldout(ids, args.fraction, args.seed)
    HELDOUT_FILE.write_text(json.dumps({
        "about": "catalog items held out from all distillation (texts, neighbours, loss banks); "
                 "`python -m encoder.data heldout`",
        "fraction": args.fraction, "seed": args.seed, "catalog_items": len(ids), "item_ids": held}) + "\n")
    print(f"wrote {len(held)} of {len(ids)} item ids to {HELDOUT_FILE}")


if __name__ == "__main__":
    main()
