"""The blended per-user ranking: co-read evidence and content similarity in one score.

Pure functions on plain data, so the service (`Recommender.recommend`) and the offline evaluation
(bench/recommendation.py) rank with the same code. For a user with recent books R:

- co-read: cf(j) = sum over i in R of c_ij / sqrt(n_i * n_j), the item-item cosine of the
  co-occurrence counts c_ij (recommender/store.py's co-read model: users who wanted i also wanted j)
  with n_i the item's distinct users; `because` is the i that contributes most. The Store computes
  it where the counts live (`Store.coread_scores`) and hands over the best candidates only.
- content: ct(j) = cosine between the user's profile vector and j's embedding.
- candidates: the `coread_candidates` best by cf and the `content_candidates` best by ct (the
  FAISS neighbours of the profile); seen books never.
- score(j) = a_j * cf(j) / max cf + (1 - a_j) * (ct(j) - min ct) / (max ct - min ct), extrema over
  the user's candidates, with a_j = coread_weight * n_j / (n_j + support_half): a book with few
  interactions has little co-read evidence for or against it and is ranked mostly by its text.
  `coread_weight` and `support_half` are chosen on a validation split of users disjoint from the
  test users (bench/recommendation.py; reports/recommendation.json).
- a book nobody has interacted with yet (n_j = 0, e.g. just added) keeps the place its text gives
  it in the profile's content list, the others fill the places around it in score order: so its
  recall is what content-only recommendation gives it, and it is recommended the moment it is
  encoded.
- signal: which part of the score carries the pick: "co-read" or "similar text" when one part is
  at least twice the other, else "both".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Signal = str  # "co-read" | "similar text" | "both"
DOMINANT = 2.0  # a part this many times the other names the signal alone


@dataclass(frozen=True)
class BlendParams:
    # Defaults: what bench.recommendation chose on validation users (reports/recommendation.json).
    coread_weight: float = 0.7
    support_half: float = 0.0
    recent_books: int = 50
    coread_per_book: int = 20  # each recent book's strongest co-read neighbours read
    coread_candidates: int = 100
    content_candidates: int = 100


DEFAULT_PARAMS = BlendParams()
COREAD_ONLY = BlendParams(coread_weight=1.0, support_half=0.0, content_candidates=0)


@dataclass(frozen=True)
class Pick:
    item_id: str
    score: float
    coread: float  # cf(j), unnormalized
    content: float  # ct(j)
    because: str | None  # the recent book the co-read evidence came from (None: content only)
    signal: Signal


@dataclass(frozen=True)
class Candidates:
    coread: dict[str, tuple[float, str]]  # j -> (cf(j), the recent book it came from)
    content: dict[str, float]  # j -> ct(j), for every candidate
    content_rank: dict[str, int]  # j -> its place in the profile's content list (content candidates)


def blend(c: Candidates, support: Mapping[str, float], params: BlendParams, k: int) -> list[Pick]:
    """The k best candidates: books with interactions by blended score; a book nobody has
    interacted with yet keeps the place its text gives it in the content list (no co-read evidence
    can rank it against the others, and a new book must be recommendable the moment it is encoded)."""
    ids = sorted(set(c.coread) | set(c.content))
    if not ids:
        return []
    cf = np.array([c.coread.get(j, (0.0, ""))[0] for j in ids])
    ct = np.array([c.content.get(j, 0.0) for j in ids])
    n = np.array([support.get(j, 0.0) for j in ids])
    scores, cf_part, ct_part = blend_scores(cf, ct, n, params)
    order = [p for p in np.lexsort((np.arange(len(ids)), -scores)) if n[p] > 0]  # equal scores: by id
    new = sorted((c.content_rank[ids[p]], p) for p in range(len(ids)) if n[p] <= 0 and ids[p] in c.content_rank)
    placed: list[int] = []
    warm = iter(order)
    for place, p in new + [(len(ids), -1)]:
        while len(placed) < min(place, k):
            nxt = next(warm, None)
            if nxt is None:
                break
            placed.append(nxt)
        if p >= 0 and len(placed) < k:
            placed.append(p)
    picks = []
    for p in placed[:k]:
        j = ids[p]
        signal = ("co-read" if cf_part[p] >= DOMINANT * ct_part[p] and cf_part[p] > 0 else
                  "similar text" if ct_part[p] >= DOMINANT * cf_part[p] else "both")
        because = c.coread[j][1] if j in c.coread and signal != "similar text" else None
        picks.append(Pick(j, float(scores[p]), float(cf[p]), float(ct[p]), because, signal))
    return picks


def blend_scores(cf: np.ndarray, ct: np.ndarray, n: np.ndarray, params: BlendParams,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, co-read part, content part) per candidate; cf >= 0, n = interactions.

    cf is scaled by its maximum (it is peaked: a few strong neighbours), ct min-max over the
    candidates (cosines crowd near the top, so dividing by the maximum alone would give every
    candidate nearly full marks)."""
    cf_norm = cf / cf.max() if cf.size and cf.max() > 0 else np.zeros_like(cf)
    spread = ct.max() - ct.min() if ct.size else 0.0
    ct_norm = (ct - ct.min()) / spread if spread > 0 else np.ones_like(ct)
    # n / (n + support_half), 0 for an item nobody interacted with (also when support_half is 0)
    support = np.divide(n, n + params.support_half, out=np.zeros_like(n, dtype=float), where=n > 0)
    a = params.coread_weight * support
    cf_part, ct_part = a * cf_norm, (1.0 - a) * ct_norm
    return cf_part + ct_part, cf_part, ct_part


def candidates(coread: Mapping[str, tuple[float, str]], content_hits: Sequence[tuple[str, float]],
               content_of: Callable[[list[str]], Mapping[str, float]], params: BlendParams) -> Candidates:
    """The co-read and content candidates. `coread` is j -> (cf(j), the recent book it came from)
    (Store.coread_scores), `content_hits` the profile's best items by content, best first; seen books
    are in neither. `content_of(ids)` gives ct for the co-read candidates outside the content hits."""
    best = sorted(coread, key=lambda j: (-coread[j][0], j))[:params.coread_candidates]
    hits = content_hits[:params.content_candidates]
    content = dict(hits)
    missing = [j for j in best if j not in content]
    if missing:
        content.update(content_of(missing))
    return Candidates({j: coread[j] for j in best}, content, {j: r for r, (j, _) in enumerate(hits)})


def rank(coread: Mapping[str, tuple[float, str]], support: Mapping[str, float],
         content_hits: Sequence[tuple[str, float]], content_of: Callable[[list[str]], Mapping[str, float]],
         params: BlendParams, k: int) -> list[Pick]:
    """The k best picks for a user: `candidates`, then `blend`."""
    return blend(candidates(coread, content_hits, content_of, params), support, params, k)
