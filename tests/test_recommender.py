"""`Recommender` (recommender/core.py) without HTTP, on the embedded store and the in-process log.

Items get hand-made embeddings in 4 dimensions, so every expected neighbour follows from the
geometry: a and b point almost the same way, c is orthogonal to both, d is the opposite of a.
"""

from __future__ import annotations

import numpy as np
import pytest

from ingest.eventlog import EventProducer, ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import InvalidEvent, ItemUpsert, parse_event
from ingest.settings import Settings
from recommender.core import Recommender, UnknownItem
from recommender.index import ItemIndex
from recommender.store import Store, open_redis
from tests.eventlogs import drain


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


VECTORS = {"a": unit(1, 0, 0, 0), "b": unit(0.9, 0.1, 0, 0), "c": unit(0, 1, 0, 0), "d": unit(-1, 0, 0, 0),
           "e": unit(0, 0, 1, 0)}
TITLES = {"a": "Dune", "b": "Dune Messiah", "c": "Emma", "d": "Ulysses", "e": "Beloved"}


@pytest.fixture
def parts():
    settings = Settings(kafka_bootstrap="", redis_url="")
    event_log = InProcessLog()
    ensure_topics(event_log, settings)
    store, index = Store(open_redis("")), ItemIndex()
    changes = store.apply_item_events([(ItemUpsert(type="item_upsert", item_id=i, title=TITLES[i], ts=10.0), v)
                                       for i, v in VECTORS.items()])
    index.apply(changes)
    return Recommender(store, index, EventProducer(event_log, settings), settings), event_log, settings


def read(user_id: str, item_id: str):
    return parse_event({"type": "interaction", "user_id": user_id, "item_id": item_id, "kind": "read", "ts": 20.0})


def test_similar_ranks_by_cosine_excludes_the_item_and_hydrates(parts):
    rec, _, _ = parts
    answer = rec.similar("a", k=3)
    assert [i["item_id"] for i in answer.items] == ["b", "c", "e"]  # c and e tie at 0: by item id
    assert answer.items[0]["title"] == "Dune Messiah"
    assert answer.items[0]["score"] == pytest.approx(float(VECTORS["a"] @ VECTORS["b"]), abs=1e-5)
    scores = [i["score"] for i in answer.items]
    assert scores == sorted(scores, reverse=True)
    assert set(answer.latency_ms) == {"lookup", "search", "hydrate", "total"}
    assert [i["item_id"] for i in rec.similar("a", k=10).items][-1] == "d"  # the opposite comes last


def test_similar_of_an_unknown_item_raises(parts):
    rec, _, _ = parts
    with pytest.raises(UnknownItem, match="unknown item 'nope'"):
        rec.similar("nope")


def test_an_item_deleted_from_the_store_is_never_hydrated(parts):
    rec, _, _ = parts
    rec.store.apply_item_events([(parse_event({"type": "item_delete", "item_id": "b", "ts": 30.0}), None)])
    assert "b" not in {i["item_id"] for i in rec.similar("a", k=4).items}  # still in this index


def test_cold_start_is_the_most_popular_unseen_indexed_items(parts):
    rec, _, _ = parts
    store = rec.store
    events = [read(u, i) for u, items in {"u1": "ce", "u2": "ce", "u3": "c"}.items() for i in items]
    store.apply_interactions(events, {})
    # "z" is popular but was never encoded: not in the index, so never offered.
    store.apply_interactions([read(f"v{n}", "z") for n in range(5)], {})
    answer = rec.recommend("newcomer", k=3)
    assert answer.extra["strategy"] == "popular" and answer.extra["cold_start"]
    assert [i["item_id"] for i in answer.items] == ["c", "e"]
    assert answer.extra["seen_count"] == 0
    # Still cold while the one book read is not in the index: nothing to search with.
    store.apply_interactions([read("w", "z")], {})
    answer = rec.recommend("w", k=3)
    assert answer.extra["cold_start"] and answer.extra["seen_count"] == 1
    assert [i["item_id"] for i in answer.items] == ["c", "e"]


def test_profile_picks_exclude_what_was_seen_and_say_why(parts):
    rec, _, _ = parts
    rec.store.apply_interactions([read("u", "a")], {"a": VECTORS["a"]})
    answer = rec.recommend("u", k=10)
    assert answer.extra["strategy"] == "profile" and not answer.extra["cold_start"]
    ids = [i["item_id"] for i in answer.items]
    assert ids[0] == "b" and "a" not in ids and len(ids) == 4
    assert answer.items[0]["because"] == {"item_id": "a", "title": "Dune"}
    assert set(answer.latency_ms) >= {"profile", "search", "explain", "hydrate", "total"}


def test_items_read_before_they_were_encoded_count_once_indexed(parts):
    rec, _, _ = parts
    rec.store.apply_interactions([read("u", "e")], {})  # e had no embedding yet
    profile = rec.store.user_profile("u")
    assert profile.vector is None and profile.pending == {"e"}
    answer = rec.recommend("u", k=2)  # e is in the index now: folded into the query
    assert answer.extra["strategy"] == "profile" and "e" not in {i["item_id"] for i in answer.items}


def test_submit_fills_id_and_time_and_produces_to_the_topic_of_the_event(parts):
    rec, event_log, settings = parts
    upsert = rec.submit({"type": "item_upsert", "item_id": "n", "title": "New"})
    interaction = rec.submit({"type": "interaction", "user_id": "u", "item_id": "n", "kind": "read"})
    assert upsert.event_id and upsert.ts > 0
    items = drain(event_log.consumer([settings.topic_item_events], "check"), quiet=0.1)
    users = drain(event_log.consumer([settings.topic_user_events], "check"), quiet=0.1)
    assert [(r.key, parse_event(r.value)) for r in items] == [("n", upsert)]
    assert [(r.key, parse_event(r.value)) for r in users] == [("u", interaction)]
    assert rec.topic_of(upsert) == settings.topic_item_events
    assert 'ternrec_events_submitted_total{type="item_upsert"} 1.0' in rec.metrics.prometheus_text().decode()


def test_submit_rejects_a_bad_event_with_the_reason_and_produces_nothing(parts):
    rec, event_log, settings = parts
    with pytest.raises(InvalidEvent, match="missing field 'item_id'"):
        rec.submit({"type": "item_upsert", "title": "no id"})
    assert drain(event_log.consumer([settings.topic_item_events], "check"), quiet=0.1) == []
    assert "ternrec_events_rejected_total 1.0" in rec.metrics.prometheus_text().decode()
