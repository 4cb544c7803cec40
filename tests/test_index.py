"""`ItemIndex` (recommender/index.py): concurrent searches share a scan and answer as alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ingest.schema import ItemChange
from recommender.index import ItemIndex
from tests.waiting import wait_for


def test_concurrent_searches_share_a_scan_and_answer_as_each_alone():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 48)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ItemIndex()
    index.apply([ItemChange(str(i), 1.0, "e", False, v) for i, v in enumerate(vectors)])
    queries = [(str(q), 1 + q % 15) for q in range(0, 2000, 125)]  # 16, with varied k and exclusions
    alone = {q: index.search(vectors[int(q)], k, exclude={q}) for q, k in queries}

    scans = []
    scan = index._scan
    index._scan = lambda batch: (scans.append(len(batch)), scan(batch))
    together: dict[str, list] = {}

    def run(q, k):
        together[q] = index.search(vectors[int(q)], k, exclude={q})

    threads = [threading.Thread(target=run, args=query) for query in queries]
    with index._scan_lock:  # a scan in progress: every query waits for the next one
        for t in threads:
            t.start()
        wait_for(lambda: len(index._waiting) == len(queries), what="all queries waiting")
    for t in threads:
        t.join()
    assert scans == [len(queries)]  # one scan searched for all of them
    for q, _ in queries:
        assert [i for i, _ in together[q]] == [i for i, _ in alone[q]]
        assert [s for _, s in together[q]] == pytest.approx([s for _, s in alone[q]], abs=1e-5)


def test_lookups_and_hydration_do_not_wait_behind_a_scan():
    index = ItemIndex()
    v = np.ones(4, np.float32) / 2
    index.apply([ItemChange("a", 1.0, "e", False, v, {"title": "A"}),
                 ItemChange("b", 1.0, "e", False, -v, {"title": "B"})])
    answers = {}

    def read():
        answers["vector"] = index.vector("a")
        answers["metadata"] = index.metadata(["a", "b", "gone"])

    with index._lock:  # what a scan (or an update) holds while FAISS runs
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "a lookup waited for the index lock"
    np.testing.assert_array_equal(answers["vector"], v)
    assert answers["metadata"] == {"a": {"title": "A"}, "b": {"title": "B"}}
    index.apply([ItemChange("a", 2.0, "e2", True, None)])  # deleted: neither vector nor metadata
    assert index.vector("a") is None and index.metadata(["a"]) == {}
