"""The recommender end to end and the profile updater's throughput, for bench/recommendation.py
and tests/test_recommendation_e2e.py.

- `updater_throughput`: interaction events through `ProfileUpdater` (recommender/profiles.py) from a
  pre-filled in-process log into a Store, events/s (against a real redis-server in the benchmark).
- `service_hits`: the embedded service (recommender.runtime with the in-process log; fakeredis or a
  real Redis by URL) on a free port: the catalog replayed and encoded by its worker, the bulk
  interactions replayed, then each test user's interactions posted to `POST /events` one by one
  (their held-out book not among them), then `GET /users/{id}/recommendations?k=10` asked once per
  test user by one client; returns each held-out book's rank in the answer and the latencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx

from ingest.catalog import Item
from ingest.eventlog import EventProducer, ensure_topics
from ingest.memory_log import InProcessLog
from ingest.replay import replay
from ingest.schema import Interaction
from ingest.services import free_port
from ingest.settings import Settings
from recommender.blend import DEFAULT_PARAMS, BlendParams
from recommender.demo import start_http
from recommender.profiles import ProfileUpdater
from recommender.runtime import Runtime
from recommender.store import Store

K = 10
CHUNK = 50_000  # interactions replayed at a time (bounded memory for the event objects)


def _interactions(pairs: Sequence[tuple[str, str]]) -> list[Interaction]:
    return [Interaction(type="interaction", user_id=u, item_id=b, kind="to_read") for u, b in pairs]


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def updater_throughput(store: Store, pairs: Sequence[tuple[str, str]], settings: Settings) -> dict:
    """Fills an in-process log with the interactions, then times ProfileUpdater draining it."""
    event_log = InProcessLog()
    ensure_topics(event_log, settings)
    producer = EventProducer(event_log, settings)
    for start in range(0, len(pairs), CHUNK):
        for event in _interactions(pairs[start:start + CHUNK]):
            producer.send(event)
        producer.flush()
    updater = ProfileUpdater(event_log, store, settings)
    began = time.perf_counter()
    consumed = 0
    while consumed < len(pairs):
        consumed += updater.step(max_records=500, timeout_ms=10)
    seconds = time.perf_counter() - began
    updater.close()
    return {"events": consumed, "new": updater.applied, "seconds": round(seconds, 2),
            "events_per_s": round(consumed / seconds, 1)}


def service_hits(items: Sequence[Item], bulk: Sequence[tuple[str, str]], test_histories: dict[str, list[str]],
                 held_out: dict[str, str], encoder, redis_url: str = "", timeout: float = 3600,
                 blend: BlendParams = DEFAULT_PARAMS) -> dict:
    """Ranks (K when absent) of the held-out books in the service's answers, and the latencies."""
    settings = Settings(kafka_bootstrap="", redis_url=redis_url, http_port=free_port(), max_wait_ms=5)
    runtime = Runtime(settings, with_workers=True, encoder=encoder)
    runtime.recommender.blend = blend
    runtime.start()
    server = start_http(runtime, settings)
    try:
        replay(runtime.event_log, settings, [i.to_event() for i in items], progress=False)
        _wait(lambda: len(runtime.index) >= len(items), timeout, "the catalog indexed")
        for start in range(0, len(bulk), CHUNK):
            replay(runtime.event_log, settings, _interactions(bulk[start:start + CHUNK]), progress=False)
        expected = len(set(bulk))
        _wait(lambda: runtime.profiles.applied >= expected, timeout, "the bulk interactions applied")
        with httpx.Client(base_url=settings.resolved_service_url, timeout=30) as http:
            posted = 0
            for user, books in test_histories.items():
                for book in books:
                    http.post("/events", json={"type": "interaction", "user_id": user, "item_id": book,
                                               "kind": "to_read"}).raise_for_status()
                    posted += 1
            expected += len({(u, b) for u, books in test_histories.items() for b in books})
            _wait(lambda: runtime.profiles.applied >= expected, timeout, "the posted interactions applied")
            ranks, client_ms, server_ms, strategies = {}, [], [], {}
            for user, held in held_out.items():
                began = time.perf_counter()
                answer = http.get(f"/users/{user}/recommendations", params={"k": K})
                client_ms.append((time.perf_counter() - began) * 1000)
                answer.raise_for_status()
                body = answer.json()
                server_ms.append(body["latency_ms"]["total"])
                ids = [i["item_id"] for i in body["items"]]
                ranks[user] = ids.index(held) if held in ids else K
                strategies[body["strategy"]] = strategies.get(body["strategy"], 0) + 1
        return {"ranks": ranks, "client_ms": client_ms, "server_ms": server_ms, "posted": posted,
                "strategies": strategies}
    finally:
        server.should_exit = True
        runtime.stop()
