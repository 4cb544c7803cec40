"""The FAISS item index: inner-product search over L2-normalized embeddings, with upsert/delete.

Index choice: an exact flat inner-product index (`IndexFlatIP`) under an `IndexIDMap2` so items
can be removed and re-added by id. For this 10,000-book catalog a flat scan is ~4 M multiply-adds
per query (well under a millisecond on one core), has perfect recall and no training, and applies
an upsert the moment it arrives — which is what freshness needs. Growing to millions of items, the
same wrapper takes a FAISS factory string such as "IVF4096,SQ8" (trained on the bootstrap
vectors): an inverted file with 8-bit scalar quantization supports add/remove by id too, keeps
memory at ~1 byte per dimension and searches a few lists instead of everything. HNSW is faster
still at that scale but cannot remove vectors, so deletes would need periodic rebuilds.

Versions: every item keeps the (ts, event_id) of the change that produced its vector (tombstones
too), so replaying `item-embeddings` from the beginning, or receiving changes out of order, never
lets an older change win. All methods are thread-safe. Only `apply` and the FAISS scan take the
index lock; the per-request reads (`vector`, `metadata`, membership) are single dict operations,
atomic under the GIL, on entries `apply` replaces whole and never changes in place: so a request's
lookup and hydration never wait behind another request's scan (they did, and at 10 concurrent
clients a replica spent more time waiting on that lock than searching).

Search: concurrent queries share one scan of the vectors (see `search`). Similar items need no
scan: with the flat index, every item's nearest items are kept as lists (recommender/neighbours.py)
and `neighbours` reads them. A change is searchable the moment `apply` returns; the lists take it
in later, when the index updater is idle (`sync_neighbours`), so that merging never delays a
change, nor competes with a backfill for the CPU; until they are up to date a scan answers.

Metadata: the title, authors, year, tags and image of every searchable item travel with its change
and are kept here, beside its vector, so that an answer is hydrated without asking Redis. Only
searchable items have an entry (a delete drops it): memory is bounded by the catalog.
"""

from __future__ import annotations

import itertools
import threading

import faiss
import numpy as np

from ingest.schema import ItemChange
from recommender.neighbours import NeighbourLists

TIE_SLACK = 8
MAX_SHARED_SCAN = 32  # queries one scan searches for at most
# FAISS's default BLAS threshold stays: measured on faiss-cpu 1.15 (10,000 x 384, one OpenMP
# thread), one query takes 0.8 ms on the per-query loop but 2.4 ms through BLAS (forcing BLAS from
# two queries up made every lone search three times slower); from three queries up both paths cost
# the same, about 2.3 ms for 4 and 5.5 ms for 32: one pass over the vectors for all of them.
_thread = threading.local()


class ItemIndex:
    def __init__(self, dim: int | None = None, factory: str = "Flat", kept_neighbours: int = 100):
        """`dim` None: taken from the first vector added (the service needs no encoder for it).
        `kept_neighbours`: up to how many nearest items `neighbours` answers from kept lists (flat
        index only; 0: no lists, every call scans)."""
        self.dim = dim
        self.factory = factory
        self._index = None if dim is None else self._new_index(dim)
        self._keep = kept_neighbours if factory == "Flat" else 0
        self._lists: NeighbourLists | None = None
        # Changes FAISS has and the lists not yet (item -> newest vector, None: removed), oldest
        # first; bounded by the catalog. While any is pending or being merged, a scan answers.
        self._unsynced: dict[str, np.ndarray | None] = {}
        self._merging = False
        self._ids: dict[str, int] = {}  # item id -> faiss id, stable for the life of the process
        self._item_of: dict[int, str] = {}
        self._versions: dict[str, tuple[float, str]] = {}
        self._metadata: dict[str, dict] = {}  # searchable item -> its metadata, when its change had it
        # Searchable item -> its vector (what FAISS holds): its keys are the searchable items.
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._waiting: list[_Search] = []  # queries waiting for a scan
        self._waiting_lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time; it takes every waiting query along

    def _new_index(self, dim: int):
        return faiss.IndexIDMap2(faiss.index_factory(dim, self.factory, faiss.METRIC_INNER_PRODUCT))

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._vectors

    def train(self, vectors: np.ndarray) -> None:
        """Only for trained factories (IVF...): fit the coarse quantizer on sample vectors."""
        with self._lock:
            if self._index is None:
                self.dim = vectors.shape[1]
                self._index = self._new_index(self.dim)
            if not self._index.is_trained:
                self._index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def apply(self, changes: list[ItemChange]) -> list[ItemChange]:
        """Upserts and deletes, newest version wins; returns the changes that took effect (at once
        searchable; the kept lists follow at `sync_neighbours`)."""
        with self._lock:
            latest: dict[str, ItemChange] = {}
            for change in changes:  # the newest change per item within this batch
                seen = latest.get(change.item_id)
                if seen is None or (change.ts, change.event_id) >= (seen.ts, seen.event_id):
                    latest[change.item_id] = change
            fresh = [c for c in latest.values() if self._takes(c)]
            if not fresh:
                return []
            stale_ids = np.array([self._ids[c.item_id] for c in fresh if c.item_id in self._vectors],
                                 dtype=np.int64)
            if len(stale_ids):
                self._index.remove_ids(stale_ids)
            upserts = [c for c in fresh if not c.deleted]
            if upserts and self._index is None:
                self.dim = len(upserts[0].embedding)
                self._index = self._new_index(self.dim)
            if upserts:
                ids = np.array([self._faiss_id(c.item_id) for c in upserts], dtype=np.int64)
                vectors = np.stack([c.embedding for c in upserts]).astype(np.float32)
                self._index.add_with_ids(vectors, ids)
                for c, row in zip(upserts, vectors, strict=True):
                    self._vectors[c.item_id] = row.copy()  # its own buffer: no batch kept alive by one row
            for c in fresh:
                self._versions[c.item_id] = (c.ts, c.event_id)
                if self._keep:
                    self._unsynced.pop(c.item_id, None)  # re-inserted: the newest change goes last
                    self._unsynced[c.item_id] = None if c.deleted else self._vectors[c.item_id]
                if c.deleted:
                    self._vectors.pop(c.item_id, None)
                if c.deleted or c.metadata is None:  # none carried: the caller asks the store
                    self._metadata.pop(c.item_id, None)
                else:
                    self._metadata[c.item_id] = c.metadata
        return fresh

    def _takes(self, change: ItemChange) -> bool:
        """Newer than what the index holds, or as new and different: a replica replaying
        `item-embeddings` after its bootstrap from Redis meets every item again, at the version it
        has, and redoing those would rebuild FAISS rows and every kept list for nothing."""
        version = (change.ts, change.event_id)
        held = self._versions.get(change.item_id, (-1.0, ""))
        if version != held:
            return version > held
        vector = self._vectors.get(change.item_id)
        if change.deleted:
            return vector is not None
        return vector is None or not np.array_equal(vector, change.embedding)

    def metadata(self, item_ids: list[str]) -> dict[str, dict]:
        """The metadata of those of `item_ids` that are searchable and have it here."""
        return {i: m for i in item_ids if (m := self._metadata.get(i)) is not None}

    def _faiss_id(self, item_id: str) -> int:
        fid = self._ids.get(item_id)
        if fid is None:
            fid = self._ids[item_id] = len(self._ids)
            self._item_of[fid] = item_id
        return fid

    def vector(self, item_id: str) -> np.ndarray | None:
        """The item's vector (None unless searchable); shared: the caller must not modify it."""
        return self._vectors.get(item_id)

    def unsynced(self) -> int:
        """Changes the kept lists have yet to take in."""
        return len(self._unsynced)

    def sync_neighbours(self, limit: int | None = None) -> int:
        """Merges up to `limit` (None: all) pending changes, oldest first, into the kept lists;
        returns how many are left. One caller at a time (the index updater, when idle)."""
        while self._unsynced:
            with self._lock:
                self._merging = True  # set before the pending ones are taken: see `neighbours`
                taken = list(itertools.islice(self._unsynced.items(), limit))  # not a copy of all
                for item_id, _ in taken:
                    del self._unsynced[item_id]
            try:
                if self._lists is None:
                    self._lists = NeighbourLists(self.dim, exact=self._keep)
                self._lists.update([i for i, v in taken if v is None], {i: v for i, v in taken if v is not None})
            finally:
                self._merging = False
            if limit is not None:
                break
        return len(self._unsynced)

    def neighbours(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The k items nearest to `item_id` (itself excluded), as `search` finds them: from its
        kept list when the lists are up to date and it has k; [] unless the item is searchable."""
        # Pending is read before merging: a merge sets `_merging` before it empties `_unsynced`.
        if not self._unsynced and not self._merging and self._lists is not None \
                and (found := self._lists.neighbours(item_id, k)) is not None:
            return found
        vector = self._vectors.get(item_id)
        return [] if vector is None else self.search(vector, k, exclude={item_id})

    def search(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        """The k best items by inner product with `query`, skipping `exclude`.

        Concurrent callers share one scan: a flat search streams every vector through the CPU
        (memory-bound), so the thread that gets the scan searches for every query waiting then,
        in one FAISS call (BLAS for two or more), and the others find their answer done.
        """
        # A few spare results so that equal scores are ordered by item id, not by insertion order
        # (a rebuilt index then answers exactly as the one it replaces).
        want = min(k + len(exclude) + TIE_SLACK, len(self._vectors))
        if want <= 0:
            return []
        search = _Search(np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim), want)
        with self._waiting_lock:
            self._waiting.append(search)
        with self._scan_lock:
            if search.found is None:  # no earlier scan took it along
                with self._waiting_lock:
                    batch, self._waiting = self._waiting[:MAX_SHARED_SCAN], self._waiting[MAX_SHARED_SCAN:]
                self._scan(batch)
        found = sorted(search.found, key=lambda hit: (-hit[1], hit[0]))
        return [(item_id, score) for item_id, score in found if item_id not in exclude][:k]

    def _scan(self, batch: list[_Search]) -> None:
        if not getattr(_thread, "single_omp", False):
            # OpenMP's thread count is per thread: a server thread would otherwise fan a
            # sub-millisecond search out to every core and spin-wait on the barrier.
            faiss.omp_set_num_threads(1)
            _thread.single_omp = True
        queries = np.stack([b.query for b in batch])
        with self._lock:
            want = min(max(b.want for b in batch), len(self._vectors))
            if want <= 0:  # everything was deleted meanwhile
                for b in batch:
                    b.found = []
                return
            scores, ids = self._index.search(queries, want)
            for b, row_scores, row_ids in zip(batch, scores, ids, strict=True):
                b.found = [(self._item_of[int(i)], float(s)) for s, i in zip(row_scores, row_ids, strict=True)
                           if i >= 0]


class _Search:
    """One caller's query, and its hits once a scan did it."""

    __slots__ = ("query", "want", "found")

    def __init__(self, query: np.ndarray, want: int):
        self.query = query
        self.want = want
        self.found: list[tuple[str, float]] | None = None
