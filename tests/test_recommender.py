"""`Recommender` (recommender/core.py) without HTTP, on the embedded store and the in-process log.

Items get hand-made embeddings in 4 dimensions, so every expected neighbour follows from the
geometry: a and b point almost the same way, c is orthogonal to both, d is the opposite of a.
"""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from ingest.eventlog import EventProducer, ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import InvalidEvent, ItemChange, ItemUpsert, parse_event
from ingest.settings import Settings
from recommender import service
from recommender.core import LaneMonitor, Recommender, Unavailable, UnknownItem
from recommender.index import ItemIndex
from recommender.service import create_app
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


def test_similar_items_are_hydrated_from_the_index_without_redis(parts):
    rec, _, _ = parts
    before = rec.similar("a", k=4).items
    down = fakeredis.FakeServer()
    down.connected = False
    rec.store.r = fakeredis.FakeRedis(server=down)  # Redis unreachable from now on
    assert rec.similar("a", k=4).items == before
    # A change without metadata (written before metadata travelled with it): that item needs Redis.
    rec.index.apply([ItemChange("c", 40.0, "x", False, VECTORS["c"])])
    with pytest.raises(redis.ConnectionError):  # the service answers 503
        rec.similar("a", k=4)


def test_a_deleted_item_leaves_the_answers_when_its_change_reaches_the_index(parts):
    rec, _, _ = parts
    (delete,) = rec.store.apply_item_events([(parse_event({"type": "item_delete", "item_id": "b", "ts": 30.0}), None)])
    rec.index.apply([delete])
    assert "b" not in {i["item_id"] for i in rec.similar("a", k=4).items}
    assert rec.index.metadata(["b", "c"]).keys() == {"c"}  # bounded by what is searchable


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


def test_content_picks_exclude_what_was_seen_and_say_why(parts):
    rec, _, _ = parts
    rec.store.apply_interactions([read("u", "a")], {"a": VECTORS["a"]})
    answer = rec.recommend("u", k=10)
    assert answer.extra["strategy"] == "hybrid" and not answer.extra["cold_start"]
    ids = [i["item_id"] for i in answer.items]
    assert ids[0] == "b" and "a" not in ids and len(ids) == 4
    assert answer.items[0]["because"] == {"item_id": "a", "title": "Dune", "signal": "similar text"}
    assert set(answer.latency_ms) >= {"profile", "search", "blend", "explain", "hydrate", "total"}


def test_coread_lifts_what_readers_of_the_same_book_wanted_and_names_that_book(parts):
    rec, _, _ = parts
    # Readers of Dune (a) also wanted Beloved (e), whose text is orthogonal to Dune's; Dune Messiah (b)
    # is as widely read, by other readers: enough support that its missing co-reads count against it.
    others = [read(f"r{n}", i) for n in range(30) for i in ("a", "e")] + [read(f"s{n}", "b") for n in range(30)]
    rec.store.apply_interactions(others + [read("u", "a")], {i: VECTORS[i] for i in VECTORS})
    answer = rec.recommend("u", k=3)
    top = answer.items[0]
    assert top["item_id"] == "e"
    assert top["because"] == {"item_id": "a", "title": "Dune", "signal": "co-read"}
    # Emma (c), read by nobody, keeps its place in the content list (second, after b); b comes third.
    assert [i["item_id"] for i in answer.items[1:]] == ["c", "b"]
    assert all(i["because"]["signal"] == "similar text" for i in answer.items[1:])
    similar = rec.similar_by("a", k=1, signal="coread")
    assert [i["item_id"] for i in similar.items] == ["e"] and similar.extra["signal"] == "coread"
    assert [i["item_id"] for i in rec.similar_by("a", k=1, signal="content").items] == ["b"]


def test_items_read_before_they_were_encoded_count_once_indexed(parts):
    rec, _, _ = parts
    rec.store.apply_interactions([read("u", "e")], {})  # e had no embedding yet
    profile = rec.store.user_profile("u")
    assert profile.vector is None and profile.pending == {"e"}
    answer = rec.recommend("u", k=2)  # e is in the index now: folded into the query
    assert answer.extra["strategy"] == "hybrid" and "e" not in {i["item_id"] for i in answer.items}


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


class Unreachable(InProcessLog):
    """An event log whose broker stops answering when `down` is set (the monitor's view of it)."""

    down = False

    def backlog(self, group, topics):
        if self.down:
            raise TimeoutError("no answer")
        return super().backlog(group, topics)


def test_health_says_degraded_once_the_broker_has_not_answered_for_stale_s(parts):
    rec, _, settings = parts
    event_log = Unreachable()
    ensure_topics(event_log, settings)
    rec.monitor = LaneMonitor(event_log, settings, rec.metrics, stale_s=3.0)
    rec.monitor.check()
    assert rec.health()["status"] == "ok" and rec.health()["kafka"]
    event_log.down = True
    rec.monitor.check()  # the answer of just now still counts ...
    assert rec.health()["status"] == "ok"
    rec.monitor._last_ok -= 3.1  # (time passing: a 50 ms stale_s raced a slow moment, 1 run in 4)
    health = rec.health()  # ... until stale_s passed without one
    assert health["status"] == "degraded" and not health["kafka"] and health["redis"]
    assert "TimeoutError: no answer" in health["dependencies"]["kafka"]["detail"]
    event_log.down = False
    rec.monitor.check()
    assert rec.health()["status"] == "ok"


class NeverAcknowledged:
    """A producer whose broker never answers: every wait runs out."""

    def send(self, topic, value, key=None):
        return self

    def wait(self, timeout):
        raise TimeoutError(f"record not acknowledged within {timeout:g} s")


def test_an_event_the_broker_did_not_acknowledge_is_refused_with_503_and_retry_after(parts):
    rec, _, _ = parts
    rec.producer.producer = NeverAcknowledged()
    with pytest.raises(Unavailable, match="kafka unavailable: the broker did not acknowledge"):
        rec.submit({"type": "item_upsert", "item_id": "n", "title": "New"})
    response = TestClient(create_app(rec)).post("/events", json={"type": "item_upsert", "item_id": "n", "title": "x"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert response.json()["detail"].startswith("kafka unavailable: the broker did not acknowledge the event")
    text = rec.metrics.prometheus_text().decode()
    assert "ternrec_events_unavailable_total 2.0" in text and "ternrec_events_submitted_total{" not in text


def test_a_plain_similar_request_is_answered_by_the_fast_path_with_the_routes_body(parts):
    rec, _, _ = parts
    client = TestClient(create_app(rec), raise_server_exceptions=False)
    routed = client.get("/items/a/similar", params={"k": 3, "via": "the route"})  # an extra: the route
    rec.similar_by = None  # the route's only call: from here on it would answer 500
    fast = client.get("/items/a/similar", params={"k": 3})
    assert fast.status_code == 200 and fast.headers["content-type"] == "application/json"
    assert fast.json()["items"] == routed.json()["items"] == rec.similar("a", k=3).items
    assert set(fast.json()["latency_ms"]) == set(routed.json()["latency_ms"])
    assert client.get("/items/a/similar", params={"k": 3, "signal": "coread"}).status_code == 500


def test_a_plain_recommendations_request_is_answered_by_the_fast_path_with_the_routes_body(parts, monkeypatch):
    rec, _, _ = parts
    rec.store.apply_interactions([read("u", "a"), read("v", "a"), read("v", "b")], dict(VECTORS))
    answered_fast = []
    fast_answer = service.FastReads._answer

    def spy(*args):
        body = fast_answer(*args)
        answered_fast.append(isinstance(body, bytes))
        return body
    monkeypatch.setattr(service.FastReads, "_answer", staticmethod(spy))
    client = TestClient(create_app(rec), raise_server_exceptions=False)
    routed = client.get("/users/u/recommendations", params={"k": 3, "via": "the route"})  # an extra: the route
    fast = client.get("/users/u/recommendations", params={"k": 3})
    assert answered_fast == [False, True]
    assert fast.status_code == routed.status_code == 200 and fast.headers["content-type"] == "application/json"
    fast_body, routed_body = fast.json(), routed.json()
    assert fast_body.pop("latency_ms").keys() == routed_body.pop("latency_ms").keys()
    assert fast_body == routed_body and fast_body["strategy"] == "hybrid"
    assert fast_body["items"][0]["item_id"] == "b"  # v read a and b
    assert client.get("/users/u/recommendations", params={"k": "0"}).status_code == 422

    def down(user_id, k=10):
        raise redis.ConnectionError("refused")
    rec.recommend = down
    answer = client.get("/users/u/recommendations")
    assert answer.status_code == 503 and answered_fast[-1] is False
    assert answer.json()["detail"].startswith("redis unavailable: per-user picks need the user's profile")


def test_the_fast_path_leaves_every_error_its_documented_answer(parts):
    rec, _, _ = parts
    client = TestClient(create_app(rec), raise_server_exceptions=False)
    assert client.get("/items/nope/similar").json() == {"detail": "unknown item 'nope'"}
    assert client.get("/items/nope/similar").status_code == 404
    for k in ("0", "101", "abc", "1e1"):
        answer = client.get(f"/items/a/similar?k={k}")
        assert answer.status_code == 422 and "query parameter 'k'" in answer.json()["detail"]
    assert client.get("/items/" + "x" * 257 + "/similar").status_code == 422

    def down(item_id, k=10):
        raise Unavailable("redis", "the metadata needs Redis", retry_after_s=5)
    rec.similar = down
    answer = client.get("/items/a/similar", params={"k": 3})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert answer.json() == {"detail": "redis unavailable: the metadata needs Redis"}
