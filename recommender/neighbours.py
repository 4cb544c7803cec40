"""Every item's nearest items, kept exact as items come and go: similar items without a search.

A flat search scans the whole catalog for each request (about 0.4 ms for 10,000 items, most of a
request's server time). An item's neighbours change only when an item arrives or leaves, far more
rarely than they are asked for, so `NeighbourLists` keeps each item's `depth` best neighbours by
inner product and updates them with each batch of changes:

- a new item: one product of its vector with every vector gives its own list, and, read the other
  way, its score in every other list: it joins those whose weakest entry it beats. A batch of B
  new items is one (B x catalog) matrix product, and the merge is vectorized over the lists.
- a removed item (deleted, or re-embedded: removed, then added anew) leaves every list holding it.

A list is exact above its `floor`: the best score of any item not in it (a newcomer that did not
enter, an entry a better newcomer pushed out, what a full computation cut off). Removing an entry
leaves the rest exact, so a list is recomputed (one scan) only when fewer than `exact` of its
entries remain above the floor; `depth` - `exact` removals can hit a list before that. A query
reads the entries above the floor, ordered by score then id as the flat search orders them.

Memory: per item a vector (4 bytes per dimension) and `depth` (row, score) pairs of 8 bytes (with
the default depth 128 and 384 dimensions, 2.5 KB; rows grow by doubling). CPU: a new item costs a
product with the catalog (as one search does) plus its share of the merge: merging 10,000 items
64 at a time took 2.8 s on one core here (BLAS on one thread).

Threads: one writer (`update`; ItemIndex.sync_neighbours calls it) and any number of readers. The
writer computes without the lists' lock and takes it only to write the rows back; a reader takes
it to read one row, so a reader waits at most for a write-back, never for a product.
"""

from __future__ import annotations

import threading

import numpy as np

CHUNK = 64  # rows per matrix product: bounds its temporaries (about 40 bytes per row per catalog item)
SLACK = 28  # entries a list keeps beyond `exact`: removals it absorbs before a rescan


class NeighbourLists:
    def __init__(self, dim: int, exact: int = 100, depth: int | None = None):
        """`exact`: how many neighbours a query may ask for (answers up to it never scan); `depth`:
        entries kept per list (default `exact` + SLACK)."""
        depth = exact + SLACK if depth is None else depth
        if not 0 < exact <= depth:
            raise ValueError(f"exact ({exact}) must be in 1..depth ({depth})")
        self.dim, self.depth, self.exact = dim, depth, exact
        self._row_of: dict[str, int] = {}
        self._item_at: list[str | None] = []  # row -> item (None: a free row)
        self._free: list[int] = []  # popped from the end: the lowest free row first
        self._high = 0  # rows at or above are free: products and scans stop there
        self._vectors = np.zeros((0, dim), np.float32)
        self._live = np.zeros(0, bool)
        self._rows = np.zeros((0, depth), np.int32)  # row -> its neighbours' rows (-1: empty)
        self._scores = np.zeros((0, depth), np.float32)  # their scores (-inf: empty)
        self._floor = np.zeros(0, np.float32)  # the best score of an item left out of the row's list
        self._bar = np.zeros(0, np.float32)  # what a newcomer must beat to enter: max(weakest, floor)
        self._lock = threading.Lock()  # write-backs and reads of rows

    def __len__(self) -> int:
        return len(self._row_of)

    def neighbours(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        """The k nearest other items, best first (equal scores by id); None for an unknown item
        or a k beyond what the list answers exactly."""
        with self._lock:
            row = self._row_of.get(item_id)
            if row is None:
                return None
            scores, floor = self._scores[row], self._floor[row]
            exact = np.flatnonzero(scores > floor)
            if k > len(exact) and np.isfinite(floor):
                return None  # items are left out above the k-th: only a scan answers
            if k < len(exact):  # the k best, and any equal to the k-th (ordered by id below)
                kth = np.partition(scores[exact], len(exact) - k)[len(exact) - k]
                exact = exact[scores[exact] >= kth]
            found = [(self._item_at[r], float(s))
                     for r, s in zip(self._rows[row, exact].tolist(), scores[exact].tolist(), strict=True)]
        found.sort(key=lambda hit: (-hit[1], hit[0]))
        return found[:k]

    def update(self, removed: list[str], added: dict[str, np.ndarray]) -> None:
        """Removes `removed` and `added`'s earlier vectors, then adds `added` (item -> vector)."""
        gone = [self._row_of[i] for i in {*removed, *added} if i in self._row_of]
        touched = [self._remove(np.array(gone, np.int64))] if gone else []
        new_rows = self._add(added)
        old = self._live[:self._high].copy()
        old[new_rows] = False
        for first in range(0, len(new_rows), CHUNK):
            chunk = new_rows[first:first + CHUNK]
            scores = self._scores_against_all(chunk)
            self._write_full(chunk, scores)
            touched.append(self._merge(chunk, scores, old))
        if touched:
            self._recompute_short(np.unique(np.concatenate(touched)))

    def _remove(self, rows: np.ndarray) -> np.ndarray:
        """Frees `rows` and takes them out of every list; returns the other lists that held them."""
        hit = np.isin(self._rows[:self._high], rows)
        holders = np.flatnonzero(hit.any(axis=1))
        with self._lock:
            self._rows[:self._high][hit] = -1
            self._scores[:self._high][hit] = -np.inf
            for row in rows.tolist():
                del self._row_of[self._item_at[row]]
                self._item_at[row] = None
            self._live[rows] = False
        self._bar[holders] = self._floor[holders]  # an empty entry: anything above the floor enters
        self._free.extend(sorted(rows.tolist(), reverse=True))
        return np.setdiff1d(holders, rows)

    def _add(self, added: dict[str, np.ndarray]) -> np.ndarray:
        """Rows for the new items (free ones first), their vectors written, their lists empty."""
        if not added:
            return np.zeros(0, np.int64)
        if len(added) > len(self._free):
            self._grow(len(self._item_at) + len(added) - len(self._free))
        rows = np.array([self._free.pop() for _ in range(len(added))], np.int64)
        self._high = max(self._high, int(rows.max()) + 1)
        self._vectors[rows] = np.stack(list(added.values()))
        with self._lock:
            for row, item_id in zip(rows.tolist(), added, strict=True):
                self._item_at[row] = item_id
                self._row_of[item_id] = row
            self._live[rows] = True
        return rows

    def _grow(self, size: int) -> None:
        """Room for at least `size` rows (doubling), the new ones free."""
        old = len(self._item_at)
        size = max(size, 2 * old, 64)

        def grown(array: np.ndarray, fill) -> np.ndarray:
            out = np.full((size, *array.shape[1:]), fill, array.dtype)
            out[:old] = array
            return out

        vectors, live, rows = grown(self._vectors, 0.0), grown(self._live, False), grown(self._rows, -1)
        scores, floor, bar = grown(self._scores, -np.inf), grown(self._floor, -np.inf), grown(self._bar, -np.inf)
        with self._lock:
            self._vectors, self._live, self._rows = vectors, live, rows
            self._scores, self._floor, self._bar = scores, floor, bar
            self._item_at.extend([None] * (size - old))
        self._free[:0] = range(size - 1, old - 1, -1)  # after the freed rows: those are reused first

    def _scores_against_all(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows) x rows in use) inner products; -inf for free rows and an item with itself."""
        scores = self._vectors[rows] @ self._vectors[:self._high].T
        scores[:, ~self._live[:self._high]] = -np.inf
        scores[np.arange(len(rows)), rows] = -np.inf
        return scores

    def _write_full(self, rows: np.ndarray, scores: np.ndarray) -> None:
        """Each of `rows` gets its list from its scores against every row in use."""
        keep, kept, floor = _best(scores, self.depth)
        with self._lock:
            self._rows[rows] = np.where(np.isfinite(kept), keep, -1)  # free rows and itself: empty
            self._scores[rows] = kept
            self._floor[rows] = floor
        self._bar[rows] = np.maximum(kept.min(axis=1), floor)

    def _merge(self, new: np.ndarray, scores: np.ndarray, old: np.ndarray) -> np.ndarray:
        """Adds the `new` items to the lists of the `old` rows they enter; returns the rows whose
        list or floor changed.

        Each (newcomer, list) pair whose score beats the list's bar replaces the list's weakest
        entry, a list's newcomers best first: one vectorized pass per rank, usually one or two.
        """
        enters = (scores > self._bar[None, :self._high]) & old[None, :]
        left_out = np.where(enters, -np.inf, scores).max(axis=0)  # newcomers that stay out of a list
        left_out[~old] = -np.inf
        raised = np.flatnonzero(left_out > self._floor[:self._high])  # may lose exact entries (ties)
        with self._lock:
            np.maximum(self._floor[:self._high], left_out, out=self._floor[:self._high])
        which, rows = np.nonzero(enters)
        if not len(rows):
            return raised
        pair_scores = scores[which, rows]
        order = np.lexsort((-pair_scores, rows))
        which, rows, pair_scores = which[order], rows[order], pair_scores[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        sizes = np.diff(np.r_[starts, len(rows)])
        slot = np.repeat(np.arange(len(starts)), sizes)  # pair -> its list among the touched
        rank = np.arange(len(rows)) - np.repeat(starts, sizes)
        touched = rows[starts]
        lists, list_scores, floor = self._rows[touched], self._scores[touched], self._floor[touched]
        for r in range(int(rank.max()) + 1):
            pick = np.flatnonzero(rank == r)
            at = slot[pick]
            weakest = list_scores[at].argmin(axis=1)
            out = list_scores[at, weakest]
            ok = pair_scores[pick] > np.maximum(out, floor[at])
            floor[at[~ok]] = np.maximum(floor[at[~ok]], pair_scores[pick[~ok]])  # stays out
            at, weakest, out, pick = at[ok], weakest[ok], out[ok], pick[ok]
            floor[at] = np.maximum(floor[at], out)  # the entry it replaces is now left out
            list_scores[at, weakest] = pair_scores[pick]
            lists[at, weakest] = new[which[pick]]
        with self._lock:
            self._rows[touched], self._scores[touched], self._floor[touched] = lists, list_scores, floor
        self._bar[touched] = np.maximum(list_scores.min(axis=1), floor)
        return np.union1d(touched, raised)

    def _recompute_short(self, rows: np.ndarray) -> None:
        """Rescans the lists of `rows` with fewer than `exact` entries above their floor."""
        rows = rows[self._live[rows]]
        exact = (self._scores[rows] > self._floor[rows, None]).sum(axis=1)
        short = rows[(exact < self.exact) & np.isfinite(self._floor[rows])]
        for first in range(0, len(short), CHUNK):
            chunk = short[first:first + CHUNK]
            self._write_full(chunk, self._scores_against_all(chunk))


def _best(scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `scores`, the columns of its `depth` best (any order; -1 past the last column),
    their scores (-inf past the last column), and the best score left out (-inf when none is)."""
    rows, width = scores.shape
    if width <= depth:
        keep = np.full((rows, depth), -1, np.int64)
        keep[:, :width] = np.arange(width)
        kept = np.full((rows, depth), -np.inf, np.float32)
        kept[:, :width] = scores
        return keep, kept, np.full(rows, -np.inf, np.float32)
    order = np.argpartition(-scores, depth, axis=1)
    left_out = np.take_along_axis(scores, order[:, depth:depth + 1], axis=1)[:, 0]
    keep = order[:, :depth]
    return keep, np.take_along_axis(scores, keep, axis=1), left_out
