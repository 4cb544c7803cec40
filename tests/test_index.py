"""`ItemIndex` (recommender/index.py): versions, shared scans, lock-free lookups; and when the index
updater calls itself caught up."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ingest.eventlog import ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import ItemChange, change_to_json
from ingest.settings import Settings
from recommender.core import IndexUpdater
from recommender.index import ItemIndex
from recommender.metrics import Metrics
from recommender.store import Store, open_redis
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


def test_a_change_takes_effect_only_if_newer_or_as_new_and_different():
    index = ItemIndex(kept_neighbours=5)
    v = np.array([1, 0], np.float32)
    assert len(index.apply([ItemChange("a", 2.0, "e2", False, v)])) == 1
    index.sync_neighbours()
    assert index.apply([ItemChange("a", 2.0, "e2", False, v.copy())]) == []  # replayed: nothing to redo
    assert index.unsynced() == 0 and index._index.ntotal == 1
    assert index.apply([ItemChange("a", 1.0, "e9", False, -v)]) == []  # older
    moved = np.array([0, 1], np.float32)
    assert len(index.apply([ItemChange("a", 2.0, "e2", False, moved)])) == 1  # same version, re-encoded
    np.testing.assert_array_equal(index.vector("a"), moved)
    assert len(index.apply([ItemChange("a", 3.0, "e3", True, None)])) == 1
    assert index.apply([ItemChange("a", 3.0, "e3", True, None)]) == []  # deleted twice
    assert len(index) == 0 and index._index.ntotal == 0


class _StartingReader:
    """A reader whose first polls find nothing although records lie ahead, as a fresh Kafka
    reader's do while it looks up its offsets."""

    def __init__(self, reader, empty_polls: int):
        self.reader, self.empty_polls = reader, empty_polls

    def poll(self, max_records: int, timeout_ms: int) -> list:
        if self.empty_polls:
            self.empty_polls -= 1
            return []
        return self.reader.poll(max_records=max_records, timeout_ms=timeout_ms)

    def lag(self) -> int:
        return self.reader.lag()


def test_the_index_updater_is_ready_only_once_nothing_is_left_to_read():
    settings = Settings(kafka_bootstrap="", redis_url="")
    event_log = InProcessLog()
    ensure_topics(event_log, settings)
    producer = event_log.producer(linger_ms=0)
    for i in range(3):
        producer.send(settings.topic_item_embeddings,
                      change_to_json(ItemChange(str(i), 1.0, "e", False, np.ones(4, np.float32) / 2)), key=str(i))
    producer.flush()
    index = ItemIndex()
    updater = IndexUpdater(event_log, Store(open_redis("")), index, settings, Metrics())
    updater.consumer = _StartingReader(updater.consumer, empty_polls=2)
    updater.step(timeout_ms=0)
    updater.step(timeout_ms=0)
    assert not updater.ready.is_set(), "empty polls with records ahead are not caught up"
    assert updater.step(timeout_ms=0) == 3 and not updater.ready.is_set()
    updater.step(timeout_ms=0)
    assert updater.ready.is_set() and len(index) == 3
