"""The pipeline in embedded mode: worker → store + index → recommender, and its HTTP API.

Uses the model-free hashing encoder (the encoder is not what these tests are about); the real
broker/Redis versions are in test_pipeline_integration.py.
"""


import numpy as np
import pytest
from fastapi.testclient import TestClient

from encoder.hashing import HashingEncoder
from ingest.catalog import load_items
from ingest.replay import replay
from ingest.schema import parse_event
from recommender.service import create_app
from tests.waiting import wait_for


@pytest.fixture
def client(embedded_runtime):
    return TestClient(create_app(embedded_runtime.recommender))


def upsert(item_id, title, ts=None, **extra):
    raw = {"type": "item_upsert", "item_id": item_id, "title": title, **extra}
    if ts is not None:
        raw["ts"] = ts
    return raw


def test_items_flow_to_index_and_store_and_are_answered(embedded_runtime, client):
    items = load_items()[:300]
    for item in items:
        client.post("/events", json=item.to_event().to_dict()).raise_for_status()
    wait_for(lambda: len(embedded_runtime.index) == 300, what="300 items indexed")
    assert embedded_runtime.store.item_count() == 300
    body = client.get("/items/1/similar", params={"k": 5}).json()
    assert len(body["items"]) == 5 and "1" not in {i["item_id"] for i in body["items"]}
    assert all(i["title"] for i in body["items"])
    assert body["latency_ms"]["total"] >= body["latency_ms"]["search"] > 0
    assert client.get("/health").json()["index_size"] == 300


def test_delete_removes_item_and_late_older_upsert_cannot_revive_it(embedded_runtime, client):
    client.post("/events", json=upsert("a", "Dune", ts=100.0)).raise_for_status()
    client.post("/events", json=upsert("b", "Dune Messiah", ts=100.0)).raise_for_status()
    wait_for(lambda: len(embedded_runtime.index) == 2)
    client.post("/events", json={"type": "item_delete", "item_id": "a", "ts": 200.0}).raise_for_status()
    wait_for(lambda: "a" not in embedded_runtime.index, what="delete applied")
    client.post("/events", json=upsert("a", "Dune (old edition)", ts=150.0)).raise_for_status()
    client.post("/events", json=upsert("c", "marker", ts=300.0)).raise_for_status()
    wait_for(lambda: "c" in embedded_runtime.index)
    assert "a" not in embedded_runtime.index
    assert client.get("/items/a/similar").status_code == 404
    assert [i["item_id"] for i in client.get("/items/b/similar").json()["items"]] == ["c"]


def test_newer_upsert_wins_whatever_the_arrival_order(embedded_runtime):
    new, old = parse_event(upsert("x", "new title", ts=20.0)), parse_event(upsert("x", "old title", ts=10.0))
    embedded_runtime.producer.send(new)
    embedded_runtime.producer.send(old)
    embedded_runtime.producer.send(parse_event(upsert("done", "marker", ts=30.0)))
    wait_for(lambda: "done" in embedded_runtime.index and "x" in embedded_runtime.index)
    assert embedded_runtime.store.items_metadata(["x"])[0]["title"] == "new title"
    expected = HashingEncoder(64).encode(["new title"])[0]
    np.testing.assert_allclose(embedded_runtime.index.vector("x"), expected, rtol=0, atol=1e-6)


def test_user_recommendations_exclude_seen_items_and_cold_start_is_labelled(embedded_runtime, client):
    for item in load_items()[:200]:
        embedded_runtime.producer.send(item.to_event())
    wait_for(lambda: len(embedded_runtime.index) == 200)
    seen = [str(i) for i in range(1, 21)]
    for item_id in seen:
        client.post("/events", json={"type": "interaction", "user_id": "u1", "item_id": item_id,
                                     "kind": "read"}).raise_for_status()
    client.post("/events", json={"type": "interaction", "user_id": "u2", "item_id": "5", "kind": "read"})
    wait_for(lambda: len(embedded_runtime.store.user_profile("u1").seen) == 20, what="profile updated")
    body = client.get("/users/u1/recommendations", params={"k": 50}).json()
    assert body["strategy"] == "hybrid" and not body["cold_start"]
    got = {i["item_id"] for i in body["items"]}
    assert len(got) == 50 and not got & set(seen)
    assert all(i["because"]["item_id"] in seen for i in body["items"])
    cold = client.get("/users/nobody/recommendations", params={"k": 5}).json()
    assert cold["cold_start"] and cold["strategy"] == "popular"
    assert cold["items"][0]["item_id"] == "5"  # interacted with by two users


def test_repeated_interaction_counts_once(embedded_runtime):
    embedded_runtime.producer.send(parse_event(upsert("1", "Dune")))
    wait_for(lambda: "1" in embedded_runtime.index)
    event = parse_event({"type": "interaction", "user_id": "u", "item_id": "1", "kind": "read"})
    assert embedded_runtime.store.apply_interactions([event, event], {"1": embedded_runtime.index.vector("1")}) == 1
    assert embedded_runtime.store.popular(5) == [("1", 1.0)]


@pytest.mark.parametrize("path, status, reason", [
    ("/items/1/similar?k=0", 422, "greater than or equal to 1"),
    ("/items/1/similar?k=101", 422, "less than or equal to 100"),
    ("/items/1/similar?k=ten", 422, "valid integer"),
    ("/items/nope/similar", 404, "unknown item 'nope'"),
    ("/users/u/recommendations?k=1000", 422, "less than or equal to 100"),
])
def test_bad_queries_get_a_4xx_with_a_reason(client, path, status, reason):
    response = client.get(path)
    assert response.status_code == status
    assert reason in response.text


@pytest.mark.parametrize("body, reason", [
    ({"type": "item_upsert", "title": "x"}, "missing field 'item_id'"),
    ({"type": "unknown"}, "unknown event type"),
    ({"type": "item_upsert", "item_id": "1", "title": "x", "text": "y" * 9000}, "over the limit"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_events_get_a_422_with_the_reason(client, body, reason):
    response = client.post("/events", json=body)
    assert response.status_code == 422
    assert reason in response.json()["detail"]


def test_metrics_and_stats_report_what_happened(embedded_runtime, client):
    client.post("/events", json=upsert("1", "Dune")).raise_for_status()
    wait_for(lambda: "1" in embedded_runtime.index)
    client.post("/events", json=upsert("2", "Emma")).raise_for_status()
    wait_for(lambda: "2" in embedded_runtime.index)
    replay(embedded_runtime.event_log, embedded_runtime.settings, [parse_event(upsert("3", "Persuasion"))],
           progress=False)  # bulk
    wait_for(lambda: "3" in embedded_runtime.index)
    embedded_runtime.monitor.check()
    client.get("/items/1/similar")
    text = client.get("/metrics").text
    assert 'ternrec_events_submitted_total{type="item_upsert"} 2.0' in text
    assert 'ternrec_freshness_seconds_count{lane="live"} 2.0' in text
    assert 'ternrec_freshness_seconds_count{lane="bulk"} 1.0' in text
    assert 'ternrec_lane_backlog{lane="live"} 0.0' in text and 'ternrec_lane_backlog{lane="bulk"} 0.0' in text
    stats = client.get("/stats").json()
    assert stats["freshness_count"] == 3 and stats["freshness_ms"]["p50"] >= 0
    assert stats["lanes"]["live"]["freshness_count"] == 2 and stats["lanes"]["bulk"]["freshness_count"] == 1
    assert stats["lanes"]["live"]["backlog"] == 0 and stats["lanes"]["bulk"]["backlog"] == 0
    assert {row["lane"] for row in stats["freshness_series"]} == {"live", "bulk"}
    assert stats["query_latency_ms"]["similar"]["count"] == 1


def test_health_reports_each_dependency(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["redis"] and body["kafka"]
    assert body["dependencies"]["redis"] == {"ok": True}
    assert body["dependencies"]["kafka"]["ok"]
