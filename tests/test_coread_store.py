"""The co-read model in Store (recommender/store.py): counts, window, pruning, idempotence.

Each test runs on a real redis-server (integration) and on fakeredis (embedded mode): the same
code, including the Lua script, must give the same counts on both.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from ingest.schema import parse_event
from recommender import store as store_module
from recommender.store import COREAD_CAP, COREAD_KEEP, COREAD_WINDOW, Store, open_redis


@pytest.fixture(params=["redis", "fakeredis"])
def store(request) -> Store:
    if request.param == "redis":
        request.applymarker(pytest.mark.integration)
        url = request.getfixturevalue("redis_url")
    else:
        url = ""
    return Store(open_redis(url))


def read(user: str, item: str, ts: float = 20.0):
    return parse_event({"type": "interaction", "user_id": user, "item_id": item, "kind": "read", "ts": ts})


def coread(store: Store, item: str) -> dict[str, float]:
    """The raw co-read list of an item: neighbour -> count."""
    return {m.decode(): c for m, c in store.r.zrevrange(f"{store.p}coread:{item}", 0, -1, withscores=True)}


def counts(store: Store, *items: str) -> dict[str, float]:
    """n_i of each item that has one."""
    return {i: c for i, c in zip(items, store.r.zmscore(f"{store.p}popular", list(items)), strict=True) if c}


def test_each_new_interaction_pairs_the_book_with_the_users_recent_ones(store):
    assert store.apply_interactions([read("u", "a"), read("u", "b"), read("u", "c")], {}) == 3
    assert store.apply_interactions([read("v", "a"), read("v", "c")], {}) == 2
    assert coread(store, "a") == {"c": 2.0, "b": 1.0}
    assert coread(store, "b") == {"a": 1.0, "c": 1.0}
    assert coread(store, "c") == {"a": 2.0, "b": 1.0}
    assert counts(store, "a", "b", "c") == {"a": 2.0, "b": 1.0, "c": 2.0}


def hand_made(store: Store, coread_lists: dict[str, dict[str, int]], readers: dict[str, int]) -> None:
    for item, row in coread_lists.items():
        store.r.zadd(f"{store.p}coread:{item}", row)
    store.r.zadd(f"{store.p}popular", readers)


# Co-read counts of two recent books: "a" (40 readers) and "b" (10 readers); "gone" lost its count.
LISTS = {"a": {"x": 20, "y": 4, "seen": 30, "gone": 7}, "b": {"y": 5, "z": 1}}
READERS = {"a": 40, "b": 10, "x": 100, "y": 10, "z": 1, "seen": 50}


def test_coread_scores_are_the_summed_item_cosine_and_name_the_strongest_source(store):
    hand_made(store, LISTS, READERS)
    scores, support = store.coread_scores(["a", "b"], exclude={"seen"}, also_count=["t", "z"])
    assert scores == {"x": (20 / math.sqrt(40 * 100), "a"),
                      # y: 4/sqrt(40*10) = 0.2 from a, 5/sqrt(10*10) = 0.5 from b: b is why.
                      "y": (4 / math.sqrt(40 * 10) + 5 / math.sqrt(10 * 10), "b"),
                      "z": (1 / math.sqrt(10 * 1), "b")}  # exact: the same sums as in Python
    # Not "seen" (excluded), not "gone" (n = 0: a pruned count with a lost item count is not evidence).
    assert support == {"a": 40.0, "b": 10.0, "x": 100.0, "y": 10.0, "z": 1.0}  # t has no count


def test_interaction_counts_are_the_distinct_readers_and_leave_out_nobody_read(store):
    hand_made(store, LISTS, READERS)
    assert store.interaction_counts(["x", "t", "z"]) == {"x": 100.0, "z": 1.0}
    assert store.interaction_counts([]) == {}


def test_coread_scores_keep_the_top_and_every_tie_at_its_last_place(store):
    hand_made(store, LISTS, READERS)
    assert set(store.coread_scores(["a", "b"], exclude={"seen"}, top=1)[0]) == {"y"}  # 0.7
    hand_made(store, {"b": {"w": 7}}, {"w": 10})  # w: 7/sqrt(10*10) = 0.7, the same float as y's sum
    assert set(store.coread_scores(["a", "b"], exclude={"seen"}, top=1)[0]) == {"y", "w"}
    # x: 20/sqrt(40*100) and z: 1/sqrt(10*1) are the same float: both share the second place.
    assert set(store.coread_scores(["a", "b"], exclude={"seen", "w"}, top=2)[0]) == {"y", "x", "z"}
    assert store.coread_scores(["a", "b"], top=0)[0] == {}


def test_a_book_nobody_read_has_no_coread_scores(store):
    assert store.coread_scores(["nobody-read-this"]) == ({}, {})
    assert store.coread_scores([]) == ({}, {})


def test_a_redelivered_or_repeated_interaction_changes_nothing(store):
    batch = [read("u", "a"), read("u", "b"), read("u", "a"), read("v", "b")]  # a twice in one batch
    assert store.apply_interactions(batch, {}) == 3
    before = (coread(store, "a"), coread(store, "b"), counts(store, "a", "b"),
              store.user_profile("u").recent)
    assert store.apply_interactions(batch, {}) == 0  # the whole batch again (at-least-once redelivery)
    assert store.apply_interactions([read("u", "b", ts=99.0)], {}) == 0  # the same pair, a later event
    after = (coread(store, "a"), coread(store, "b"), counts(store, "a", "b"),
             store.user_profile("u").recent)
    assert after == before
    assert before[0] == {"b": 1.0} and before[2] == {"a": 1.0, "b": 2.0} and before[3] == ["b", "a"]


def test_two_writers_with_the_same_batch_apply_it_once(store):
    batch = [read(f"u{n % 7}", f"i{n % 13}") for n in range(200)]
    expected = len({(e.user_id, e.item_id) for e in batch})
    barrier = threading.Barrier(2)
    applied = []

    def write():
        barrier.wait()
        applied.append(store.apply_interactions(batch, {}))

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(applied) == expected  # one of them applied it, the other found it seen (or retried)
    reference = Store(open_redis(""))
    reference.apply_interactions(batch, {})
    for item in {e.item_id for e in batch}:
        assert coread(store, item) == coread(reference, item)


def test_the_window_bounds_the_pairs_of_an_event(store):
    books = [f"b{n:03d}" for n in range(COREAD_WINDOW + 5)]
    store.apply_interactions([read("u", b) for b in books], {})
    newest = coread(store, books[-1])
    assert set(newest) == set(books[-1 - COREAD_WINDOW:-1])  # only the COREAD_WINDOW books before it
    assert books[0] not in newest


def test_a_neighbour_list_is_pruned_to_its_strongest_past_the_cap(store):
    strong = [f"s{n}" for n in range(5)]
    events = [read(f"strong-{r}-{s}", b) for s in strong for r in range(3) for b in ("hub", s)]
    events += [read(f"weak-{n}", b) for n in range(COREAD_CAP + 20) for b in ("hub", f"w{n:03d}")]
    store.apply_interactions(events, {})
    hub = coread(store, "hub")
    assert len(hub) <= COREAD_CAP
    assert len(hub) >= COREAD_KEEP
    assert all(hub[s] == 3.0 for s in strong)  # the strongest survive every prune


def test_the_profile_vector_is_the_decayed_sum_across_one_batch(store):
    a, b = np.array([1, 0], np.float32), np.array([0, 1], np.float32)
    store.apply_interactions([read("u", "a", ts=10.0), read("u", "b", ts=10.0 + store_module.PROFILE_HALF_LIFE_S)],
                             {"a": a, "b": b})
    assert store.user_profile("u").vector == pytest.approx([0.5, 1.0])  # a has decayed by one half-life
