"""The service's answers while the broker or Redis is down (issue 9, outages answered).

The recommender runs in-process (`Runtime` + the FastAPI app) against a private broker or a private
redis-server, which the test SIGKILLs and then starts again on the same port and data directory:
no request waits longer than about 2 s; `POST /events` answers 503 with the reason and a
`Retry-After` (never 202 for an event the broker did not acknowledge); similar items are still
served from the replica's index; per-user picks answer 503; `/health` says which dependency is
down and that the service is degraded; everything answers as before once the dependency is back.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from encoder.hashing import HashingEncoder
from ingest.eventlog import EventConsumer
from ingest.kafka_log import KafkaLog
from ingest.replay import Selection, replay, selected_events
from ingest.settings import Settings
from recommender.runtime import Runtime
from recommender.service import create_app
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
# No request blocks longer than about 2 s (issue 9): the bound is Settings.request_timeout_s (1.5 s);
# the margin keeps a loaded machine from failing the test (the figures are printed).
WITHIN_S = Settings().request_timeout_s + 1.5


def timed(call):
    began = time.monotonic()
    response = call()
    took = time.monotonic() - began
    print(f"{response.request.method} {response.request.url.path}: {response.status_code} in {took:.2f} s")
    return response, took


def new_book(n: int) -> dict:
    return {"type": "item_upsert", "item_id": f"new-{n}", "title": f"New book {n}", "event_id": f"e{n}"}


def assert_unavailable(response, took: float, dependency: str, says: str) -> None:
    assert took < WITHIN_S, f"answered after {took:.1f} s"
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    detail = response.json()["detail"]
    assert detail.startswith(f"{dependency} unavailable:") and says in detail, detail


def test_with_the_broker_down_events_get_a_503_and_health_says_degraded(private_kafka, redis_url, name_prefix):
    topics = {f"topic_{n}": f"{name_prefix}-{n}" for n in ("item_events", "item_backfill", "user_events",
                                                            "item_embeddings", "dead_letter")}
    settings = Settings(kafka_bootstrap=private_kafka.bootstrap, redis_url=redis_url, **topics)
    runtime = Runtime(settings, with_workers=False)
    runtime.start()
    client = TestClient(create_app(runtime.recommender))
    try:
        assert client.post("/events", json=new_book(0)).status_code == 202
        health = client.get("/health").json()
        assert health["kafka"], health["dependencies"]

        private_kafka.kill()
        for n in range(1, 4):
            response, took = timed(lambda n=n: client.post("/events", json=new_book(n)))
            assert_unavailable(response, took, "kafka", "did not acknowledge the event")

        def degraded() -> bool:
            response, took = timed(lambda: client.get("/health"))
            assert took < WITHIN_S, f"/health answered after {took:.1f} s"
            body = response.json()
            return response.status_code == 503 and body["status"] == "degraded" and not body["kafka"]

        wait_for(degraded, timeout=15, what="/health to report the broker down", every=0.2)
        body = client.get("/health").json()
        assert body["redis"] and body["dependencies"]["redis"] == {"ok": True}
        assert "has not answered" in body["dependencies"]["kafka"]["detail"]

        private_kafka.start()  # the same port and data directory
        wait_for(lambda: client.post("/events", json=new_book(4)).status_code == 202, timeout=90,
                 what="events accepted again", every=0.5)
        wait_for(lambda: client.get("/health").status_code == 200, timeout=30, what="/health ok again")
    finally:
        runtime.stop()
    # What was answered 202 is on the live lane; what was answered 503 is not.
    with KafkaLog(private_kafka.bootstrap) as event_log:
        consumer = EventConsumer(event_log, settings, [settings.topic_item_events], "audit")
        deadline, ids = time.monotonic() + 30, []
        while time.monotonic() < deadline and len(ids) < 2:
            ids += [event.item_id for _, event in consumer.poll(timeout_ms=500)]
        ids += [event.item_id for _, event in consumer.poll(timeout_ms=2000)]  # anything more
        consumer.close()
    # Each exactly once; in no particular order (the two books are keyed to different partitions).
    assert sorted(ids) == ["new-0", "new-4"]


def test_with_redis_down_similar_items_come_from_the_index_and_picks_get_a_503(kafka_settings, make_redis):
    redis_server = make_redis(password="pw")
    settings = kafka_settings.model_copy(update={"redis_url": redis_server.url, "max_wait_ms": 2})
    runtime = Runtime(settings, with_workers=True, encoder=HashingEncoder(32))
    runtime.start()
    client = TestClient(create_app(runtime.recommender))
    try:
        events = selected_events(Selection(limit=100, users=3))
        replay(runtime.event_log, settings, events, progress=False)
        user = next(e.user_id for e in events if e.type == "interaction")
        wait_for(lambda: len(runtime.index) == 100 and runtime.store.user_profile(user).seen, timeout=60,
                 what="items indexed and a profile")
        similar = client.get("/items/1/similar", params={"k": 5}).json()["items"]
        assert client.get(f"/users/{user}/recommendations").status_code == 200

        redis_server.kill()
        response, took = timed(lambda: client.get("/items/1/similar", params={"k": 5}))
        assert took < WITHIN_S and response.status_code == 200
        assert response.json()["items"] == similar  # the replica's index and metadata, no Redis
        response, took = timed(lambda: client.get(f"/users/{user}/recommendations"))
        assert_unavailable(response, took, "redis", "per-user picks need the user's profile")
        response, took = timed(lambda: client.get("/health"))
        assert took < WITHIN_S and response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded" and not body["redis"] and body["kafka"]
        assert body["dependencies"]["redis"]["detail"]
        response, took = timed(lambda: client.post("/events", json=new_book(1)))
        assert took < WITHIN_S and response.status_code == 202  # the broker takes it; the worker waits

        redis_server.start()  # the same port and data directory
        wait_for(lambda: client.get(f"/users/{user}/recommendations").status_code == 200, timeout=30,
                 what="per-user picks again")
        wait_for(lambda: "new-1" in runtime.index, timeout=60, what="the event accepted meanwhile indexed")
        assert client.get("/health").status_code == 200
    finally:
        runtime.stop()
