"""Kept neighbour lists (recommender/neighbours.py): exact as items come, change and go."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ingest.eventlog import ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import ItemChange, change_to_json
from ingest.settings import Settings
from recommender import core
from recommender.index import ItemIndex
from recommender.metrics import Metrics
from recommender.neighbours import NeighbourLists
from recommender.store import Store, open_redis


def _nearest(vectors: dict[str, np.ndarray], item_id: str, k: int) -> list[tuple[str, float]]:
    """Brute force: the k best other items by inner product, equal scores by id."""
    query = vectors[item_id]
    hits = [(other, float(query @ v)) for other, v in vectors.items() if other != item_id]
    return sorted(hits, key=lambda hit: (-hit[1], hit[0]))[:k]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_lists_answer_as_a_full_scan_through_adds_updates_and_deletes(seed, ties):
    rng = np.random.default_rng(seed)
    lists = NeighbourLists(dim=6, depth=10, exact=5)  # small lists: cut back and rescanned often
    vectors: dict[str, np.ndarray] = {}
    answered = asked = 0
    for _ in range(40):
        added, removed = {}, []
        for _ in range(rng.integers(0, 14)):
            item_id = f"i{rng.integers(0, 50)}"
            if item_id in vectors and rng.random() < 0.3:
                removed.append(item_id)
            else:  # a new item, or a new vector for a known one; rounded ones tie
                v = rng.standard_normal(6).astype(np.float32)
                added[item_id] = np.round(v) if ties and rng.random() < 0.3 else v
        removed = sorted(set(removed) - set(added))
        lists.update(removed, added)
        for item_id in removed:
            del vectors[item_id]
        vectors.update(added)
        assert len(lists) == len(vectors)
        for item_id in vectors:
            for k in (1, 3, 5):
                found = lists.neighbours(item_id, k)
                asked += 1
                if found is None:  # equal scores across the cut: which of them is left out is unknown
                    assert ties, "without ties a list always answers up to `exact`"
                    continue
                answered += 1
                expected = _nearest(vectors, item_id, k)
                assert [i for i, _ in found] == [i for i, _ in expected]
                assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert answered > 0.8 * asked
    assert lists.neighbours("never-seen", 3) is None


def test_a_list_answers_only_what_it_knows_exactly():
    lists = NeighbourLists(dim=2, depth=3, exact=2)
    angles = np.linspace(0, np.pi, 8)
    lists.update([], {f"i{n}": np.array([np.cos(a), np.sin(a)], np.float32) for n, a in enumerate(angles)})
    assert [i for i, _ in lists.neighbours("i0", 3)] == ["i1", "i2", "i3"]
    assert lists.neighbours("i0", 4) is None  # a fourth is not kept: the caller must scan
    with pytest.raises(ValueError):
        NeighbourLists(dim=2, depth=3, exact=4)


def _at(degrees: float) -> np.ndarray:
    return np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], np.float32)


def test_an_item_left_out_of_a_full_list_is_not_forgotten_when_the_list_shrinks():
    lists = NeighbourLists(dim=2, depth=3, exact=2)
    lists.update([], {"t": _at(0), "a": _at(10), "b": _at(20), "c": _at(30)})
    lists.update([], {"n": _at(40)})  # t's list is full: n stays out, below c
    lists.update(["a"], {})  # t keeps b and c, which are still exact
    lists.update([], {"m": _at(50)})  # below n: m must not take the free place n would have
    assert [i for i, _ in lists.neighbours("t", 2)] == ["b", "c"]
    assert lists.neighbours("t", 3) is None  # n's place is unknown to the list: the caller scans


def test_a_stream_of_new_items_never_rescans_a_list():
    rng = np.random.default_rng(1)
    lists = NeighbourLists(dim=8, depth=12, exact=8)
    rescans = []
    write_full = lists._write_full
    lists._write_full = lambda rows, scores: (rescans.extend(rows.tolist()), write_full(rows, scores))
    for batch in range(30):
        names = [f"b{batch}-{n}" for n in range(10)]
        lists.update([], dict(zip(names, rng.standard_normal((10, 8)).astype(np.float32), strict=True)))
        assert len(rescans) == 10, "only the newcomers' own lists are computed in full"
        rescans.clear()


def _change(item_id: str, ts: float, vector: np.ndarray | None) -> ItemChange:
    return ItemChange(item_id, ts, f"e{ts}", vector is None, vector, None if vector is None else {"title": item_id})


def test_the_index_answers_similar_items_from_its_lists_as_its_search_does():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ItemIndex(kept_neighbours=20)
    for first in range(0, 300, 32):  # as the stream brings them
        index.apply([_change(str(i), 1.0, vectors[i]) for i in range(first, min(300, first + 32))])
    index.apply([_change(str(i), 2.0, None) for i in range(0, 300, 7)]  # deletes
                + [_change(str(i), 2.0, -vectors[i]) for i in range(3, 300, 11)])  # re-embedded
    scans = []
    scan = index._scan
    index._scan = lambda batch: (scans.append(len(batch)), scan(batch))
    assert index.unsynced() == 300 - len(range(0, 300, 7)) + len(range(0, 300, 7))  # every item, once
    before = index.neighbours("1", 20)
    assert scans, "until the lists have taken the changes in, a scan answers"
    scans.clear()
    left = [index.sync_neighbours(64) for _ in range(5)]
    assert left == [236, 172, 108, 44, 0]  # a slice at a time, as the idle index updater does
    for item_id in ("1", "3", "150", "299"):
        vector = index.vector(item_id)
        searched = index.search(vector, 20, exclude={item_id})
        assert len(scans) == 1
        kept = index.neighbours(item_id, 20)
        assert len(scans) == 1, "the kept list answered without a scan"
        assert [i for i, _ in kept] == [i for i, _ in searched]
        assert [s for _, s in kept] == pytest.approx([s for _, s in searched], abs=1e-5)
        scans.clear()
        beyond = index.search(vector, 40, exclude={item_id})
        assert [i for i, _ in index.neighbours(item_id, 40)] == [i for i, _ in beyond]
        assert scans, "beyond its kept neighbours the index scans"
        scans.clear()
    after = index.neighbours("1", 20)
    assert [i for i, _ in after] == [i for i, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], abs=1e-5)
    assert index.neighbours("0", 5) == []  # deleted
    assert index.neighbours("unknown", 5) == []


def test_an_index_without_lists_scans_for_similar_items():
    index = ItemIndex(kept_neighbours=0)
    index.apply([_change("a", 1.0, np.array([1, 0], np.float32)), _change("b", 1.0, np.array([0.6, 0.8], np.float32)),
                 _change("c", 1.0, np.array([-1, 0], np.float32))])
    assert index.unsynced() == 0 and index.sync_neighbours() == 0 and index._lists is None
    assert [i for i, _ in index.neighbours("a", 2)] == ["b", "c"]


def test_the_index_updater_merges_a_trickle_after_a_lag_and_a_flood_when_quiet(monkeypatch):
    monkeypatch.setattr(core, "SYNC_BATCH", 8)
    monkeypatch.setattr(core, "SYNC_LAG_S", 0.3)
    monkeypatch.setattr(core, "SYNC_QUIET_S", 30.0)  # never quiet enough: only the lag rule merges
    settings = Settings(kafka_bootstrap="", redis_url="")
    event_log = InProcessLog()
    ensure_topics(event_log, settings)
    index = ItemIndex(kept_neighbours=5)
    updater = core.IndexUpdater(event_log, Store(open_redis("")), index, settings, Metrics())
    producer = event_log.producer(linger_ms=0)
    rng = np.random.default_rng(2)

    def publish(first: int, n: int) -> None:
        for i in range(first, first + n):
            change = _change(str(i), 1.0, rng.standard_normal(4).astype(np.float32))
            producer.send(settings.topic_item_embeddings, change_to_json(change), key=change.item_id)
        producer.flush()

    publish(0, 5)  # a trickle: merged once the oldest has waited the lag
    assert updater.step(timeout_ms=0) == 5 and updater.step(timeout_ms=0) == 0
    assert index.unsynced() == 5, "a merge of so few waits, in case more come"
    began = time.monotonic()
    updater.step(timeout_ms=5000)  # idle: the poll waits only until the lag is over, then merges
    assert time.monotonic() - began < 4 and index.unsynced() == 0
    vector = index.vector("3")
    assert [i for i, _ in index.neighbours("3", 4)] == [i for i, _ in index.search(vector, 4, exclude={"3"})]

    publish(5, 10)  # a flood: it waits for a quiet moment, the lag notwithstanding
    assert updater.step(timeout_ms=0) == 10
    updater.step(timeout_ms=500)
    assert index.unsynced() == 10
    monkeypatch.setattr(core, "SYNC_QUIET_S", 0.2)
    began = time.monotonic()
    updater.step(timeout_ms=5000)
    assert time.monotonic() - began < 4 and index.unsynced() == 0
