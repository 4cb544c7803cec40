"""The pipeline on a real Kafka broker and a real redis-server, with the worker as a real process.

End to end with the default encoder; fault tests (worker SIGKILLed mid-stream, Redis restarted
under a running worker, two workers, recommender restarted) with the model-free hashing encoder so
that the many restarts stay cheap and embeddings can be compared bit for bit. The fault tests run
with both lanes active: a backfill streams on the bulk lane while live traffic (new items, and
newer versions of backfilled ones) arrives on the live lane.
"""

import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ingest.catalog import load_items
from ingest.eventlog import EventProducer
from ingest.replay import Selection, replay, selected_events
from ingest.schema import ItemDelete, ItemUpsert
from ingest.settings import Settings
from recommender.runtime import Runtime
from recommender.service import create_app
from recommender.store import Store, open_redis
from tests import waiting
from tests.processes import settings_env, start_module

pytestmark = pytest.mark.integration
wait_for = partial(waiting.wait_for, timeout=120.0, every=0.1)  # real services: slower


@pytest.fixture
def settings(stack_settings):
    """This test's own topics, an emptied Redis, and a short micro-batch wait."""
    return stack_settings.model_copy(update={"max_wait_ms": 5})


def with_topics_and_db(settings: Settings, db: int) -> Settings:
    """The same servers, fresh topics and another Redis database: an independent second run."""
    prefix = uuid.uuid4().hex[:8]
    return settings.model_copy(update={
        "redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{db}",
        **{f"topic_{n}": f"{prefix}-{n}" for n in ("item_events", "item_backfill", "user_events",
                                                   "item_embeddings", "dead_letter")}})


class WorkerProcess:
    """`python -m recommender.worker` as a child process, killable at any instant."""

    def __init__(self, settings: Settings, encoder: str, log_dir: Path, name: str = "worker"):
        self.env = settings_env(settings, encoder)
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = start_module("recommender.worker", self.env, self.log_path)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def worker_factory(tmp_path):
    workers = []

    def make(settings, encoder="hashing:384"):
        worker = WorkerProcess(settings, encoder, tmp_path, name=f"worker{len(workers) + 1}")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.kill()


def item_events(n):
    return [item.to_event() for item in load_items()[:n]]


def store_for(settings) -> Store:
    return Store(open_redis(settings.redis_url))


def stored_item_keys(store: Store) -> list[bytes]:
    return list(store.r.scan_iter(match=f"{store.p}item:*", count=1000))


def faiss_rows(index) -> int:
    """The vectors FAISS holds, read between applies (an apply removes an item's old row before
    it adds the new one)."""
    with index._lock:
        return index._index.ntotal


def test_end_to_end_with_the_default_encoder(settings, worker_factory):
    worker = worker_factory(settings, encoder="")  # the product's default model
    worker.start()
    runtime = Runtime(settings, with_workers=False)  # the service side: no encoder
    runtime.start()
    try:
        events = selected_events(Selection(limit=2000, users=50, interleave=True))
        summary = replay(runtime.event_log, settings, events, progress=False)
        assert summary.failed == 0
        wait_for(lambda: len(runtime.index) == 2000, timeout=600, what="2,000 items indexed")
        store = store_for(settings)
        assert store.item_count() == 2000 and len(stored_item_keys(store)) == 2000
        assert faiss_rows(runtime.index) == 2000  # no duplicate vectors
        client = TestClient(create_app(runtime.recommender))
        for item in load_items()[:2000]:
            response = client.get(f"/items/{item.item_id}/similar", params={"k": 5})
            assert response.status_code == 200, item.item_id
            assert len(response.json()["items"]) == 5
        # Per-user recommendations never include a seen item.
        users = sorted({e.user_id for e in events if e.type == "interaction"})
        wait_for(lambda: all(store.user_profile(u).seen for u in users), what="profiles")
        for user in users:
            seen = store.user_profile(user).seen
            got = {i["item_id"] for i in client.get(f"/users/{user}/recommendations", params={"k": 30})
                   .json()["items"]}
            assert got and not got & seen
        # A deleted item disappears from every answer.
        neighbour = client.get("/items/1/similar", params={"k": 1}).json()["items"][0]["item_id"]
        EventProducer(runtime.event_log, settings).send(ItemDelete(type="item_delete", item_id=neighbour))
        wait_for(lambda: neighbour not in runtime.index, what="delete applied")
        assert client.get(f"/items/{neighbour}/similar").status_code == 404
        assert neighbour not in {i["item_id"] for i in client.get("/items/1/similar", params={"k": 50})
                                 .json()["items"]}
        assert store.item_count() == 1999
    finally:
        runtime.stop()
        assert worker.stop() == 0  # SIGTERM drains and exits cleanly


def live_events(new: int, updated: int) -> list[ItemUpsert]:
    """`new` items of their own and newer versions of the first `updated` catalog items (made after
    the backfill's events, so newer by version whichever lane delivers last)."""
    catalog = load_items()
    fresh = [ItemUpsert(type="item_upsert", item_id=f"live-{k}", title=f"live book {k}",
                        text=catalog[k].text + " (live)") for k in range(new)]
    edits = [ItemUpsert(type="item_upsert", item_id=item.item_id, title=item.title + " (2nd edition)",
                        text=item.text + " revised") for item in catalog[:updated]]
    mixed = fresh + edits
    random.Random(1).shuffle(mixed)
    return mixed


def both_lanes(settings: Settings, backfill: list, live: list, backfill_rate: float, live_rate: float):
    """Threads streaming `backfill` on the bulk lane and `live` on the live lane at once."""
    def stream_live():
        with _kafka_log(settings) as event_log:
            producer = EventProducer(event_log, settings, lane="live")
            began = time.perf_counter()
            for n, event in enumerate(live):
                time.sleep(max(0.0, n / live_rate - (time.perf_counter() - began)))
                producer.send(event)
            producer.flush(timeout=60)

    def stream_backfill():
        with _kafka_log(settings) as event_log:
            assert replay(event_log, settings, backfill, rate=backfill_rate, progress=False).failed == 0

    senders = [threading.Thread(target=stream_backfill), threading.Thread(target=stream_live)]
    for sender in senders:
        sender.start()
    return senders


def distinct_items(*event_lists) -> set[str]:
    return {e.item_id for events in event_lists for e in events}


def assert_live_versions_won(store: Store, live: list) -> None:
    edits = {e.item_id: e.title for e in live if not e.item_id.startswith("live-")}
    assert edits and [m["title"] for m in store.items_metadata(list(edits))] == list(edits.values())


def run_clean(settings: Settings, worker_factory, backfill, live) -> dict[str, np.ndarray]:
    worker = worker_factory(settings)
    worker.start()
    store = store_for(settings)
    for lane, events in (("bulk", backfill), ("live", live)):
        with _kafka_log(settings) as event_log:  # closing the log closes its producer
            producer = EventProducer(event_log, settings, lane=lane)
            for event in events:
                producer.send(event)
            producer.flush()
    items = distinct_items(backfill, live)
    wait_for(lambda: store.item_count() == len(items), what="clean run")
    worker.stop()
    return store.item_embeddings(sorted(items))


def _kafka_log(settings):
    from ingest.kafka_log import KafkaLog

    return KafkaLog(settings.kafka_bootstrap)


def test_worker_killed_at_random_moments_loses_nothing_and_duplicates_nothing(settings, worker_factory):
    events, live = item_events(5000), live_events(new=300, updated=200)
    total = len(distinct_items(events, live))  # 5,300
    worker = worker_factory(settings)
    worker.start()
    senders = both_lanes(settings, events, live, backfill_rate=1500, live_rate=120)
    rng = random.Random(7)
    kills = 0
    while any(s.is_alive() for s in senders) or kills < 3:
        time.sleep(rng.uniform(0.3, 1.2))
        worker.kill()
        kills += 1
        worker.start()
    for sender in senders:
        sender.join()
    store = store_for(settings)
    wait_for(lambda: store.item_count() == total, what="all items after restarts")
    worker.stop()
    assert kills >= 3
    assert len(stored_item_keys(store)) == total
    assert_live_versions_won(store, live)

    # The index, bootstrapped from Redis and the item-embeddings log, holds each item once.
    runtime = Runtime(settings, with_workers=False)
    runtime.start()
    try:
        wait_for(lambda: runtime.index_updater.ready.is_set(), what="index caught up")
        assert len(runtime.index) == total and faiss_rows(runtime.index) == total
    finally:
        runtime.stop()

    # Embeddings equal a clean run's (fresh topics and database, no kills).
    clean_settings = with_topics_and_db(settings, db=1)
    store_for(clean_settings).r.flushdb()
    clean = run_clean(clean_settings, worker_factory, events, live)
    crashed = store.item_embeddings(sorted(distinct_items(events, live)))
    assert clean.keys() == crashed.keys() and len(clean) == total
    for item_id, vector in clean.items():
        np.testing.assert_array_equal(crashed[item_id], vector)


def test_recommender_restart_answers_the_same(settings, worker_factory):
    worker = worker_factory(settings)
    worker.start()
    first = Runtime(settings, with_workers=False)
    first.start()
    replay(first.event_log, settings, item_events(1500), progress=False)
    wait_for(lambda: len(first.index) == 1500, what="1,500 items indexed")
    before = {str(i): first.recommender.similar(str(i), 10).items for i in range(1, 200)}
    first.stop()
    worker.stop()
    second = Runtime(settings, with_workers=False)
    second.start()
    try:
        assert len(second.index) == 1500  # bootstrapped from Redis alone
        after = {str(i): second.recommender.similar(str(i), 10).items for i in range(1, 200)}
        assert after == before
    finally:
        second.stop()


def test_redis_restart_under_a_running_worker_loses_nothing(settings, worker_factory, make_redis):
    redis_server = make_redis(password="s3cret")  # a private server: restarting it disturbs no one
    settings = settings.model_copy(update={"redis_url": redis_server.url})
    worker = worker_factory(settings)
    worker.start()
    events, live = item_events(3000), live_events(new=150, updated=150)
    items = distinct_items(events, live)
    senders = both_lanes(settings, events, live, backfill_rate=1000, live_rate=100)
    store = store_for(settings)
    wait_for(lambda: store.item_count() > 300, what="worker writing")
    redis_server.restart()
    for sender in senders:
        sender.join()
    wait_for(lambda: store.item_count() == len(items), what="all items after the Redis restart")
    assert worker.proc.poll() is None  # the worker waited and retried; it did not die
    assert worker.stop() == 0
    assert len(stored_item_keys(store)) == len(items)
    assert set(store.item_embeddings(sorted(items))) == items
    assert_live_versions_won(store, live)



def test_two_workers_share_the_partitions(settings, worker_factory):
    workers = [worker_factory(settings), worker_factory(settings)]
    for worker in workers:
        worker.start()
    for worker in workers:  # both in the group before the stream starts
        wait_for(lambda w=worker: "consuming" in w.log_path.read_text(), what=f"{worker.name} up")
    # Paced over ~8 s so that the groups' rebalances settle while items still arrive on both lanes.
    events, live = item_events(2000), live_events(new=200, updated=100)
    items = distinct_items(events, live)
    for sender in both_lanes(settings, events, live, backfill_rate=250, live_rate=40):
        sender.join()
    store = store_for(settings)
    wait_for(lambda: store.item_count() == len(items), what="2,200 items from two workers")
    codes = [w.stop() for w in workers]
    assert codes == [0, 0], "\n".join(w.log_path.read_text()[-2000:] for w in workers)
    assert len(stored_item_keys(store)) == len(items)
    assert_live_versions_won(store, live)
    # Both did some of the work: each logs how many items it encoded when it stops.
    encoded = [int(m) for w in workers for m in re.findall(r"(\d+) items encoded", w.log_path.read_text())]
    assert len(encoded) == 2 and all(n > 0 for n in encoded) and sum(encoded) >= len(items)
