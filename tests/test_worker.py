"""The encoder worker on the in-process log and the embedded store: commit ordering and lanes.

Offsets of an item lane are committed only after the Redis writes of their batch and only once
every `item-embeddings` publish of it is acknowledged. The publishes go through `HeldProducer`, a
producer that appends at once but acknowledges only when the test says so (a slow broker), and
Redis is taken away with fakeredis's `connected` switch. The live lane is drained before the bulk
lane, bulk batches are cut while live events flow, and the version rule holds across lanes.
The same ordering on a real broker is in test_lanes.py.
"""

from __future__ import annotations

import threading
import uuid

import fakeredis
import numpy as np
import pytest

from encoder.hashing import HashingEncoder
from ingest.eventlog import EventProducer, ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import change_from_json, parse_event
from ingest.settings import Settings
from recommender.store import Store
from recommender.worker import LIVE_QUIET_S, MAX_UNCONFIRMED, EncoderWorker
from tests.eventlogs import drain
from tests.waiting import wait_for

SETTINGS = Settings(kafka_bootstrap="", redis_url="", max_batch=4, max_wait_ms=2)


class HeldDelivery:
    def __init__(self, producer: HeldProducer):
        self.producer = producer

    def done(self) -> bool:
        return self.producer.acknowledged.is_set()

    def error(self) -> Exception | None:
        return self.producer.failure if self.done() else None


class HeldProducer:
    """Appends every record at once; acknowledges them all when `acknowledge()` is called."""

    def __init__(self, event_log: InProcessLog):
        self.inner = event_log.producer()
        self.acknowledged = threading.Event()
        self.failure: Exception | None = None

    def send(self, topic: str, value: bytes, key: str | None = None) -> HeldDelivery:
        self.inner.send(topic, value, key)
        return HeldDelivery(self)

    def acknowledge(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.acknowledged.set()

    def flush(self, timeout: float | None = None) -> None:
        if not self.acknowledged.wait(timeout):
            raise TimeoutError(f"not acknowledged within {timeout} s")
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        pass


@pytest.fixture
def event_log() -> InProcessLog:
    log = InProcessLog()
    ensure_topics(log, SETTINGS)
    return log


@pytest.fixture
def redis_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def new_worker(event_log, redis_server, held: bool = True, settings: Settings = SETTINGS) -> EncoderWorker:
    worker = EncoderWorker(event_log, Store(fakeredis.FakeRedis(server=redis_server)), HashingEncoder(16), settings)
    worker.commit_every_s = 0  # commit whatever is acknowledged at every settle
    if held:
        worker.producer = HeldProducer(event_log)
    return worker


def send_items(event_log, ids, lane: str = "live", **fields) -> None:
    producer = EventProducer(event_log, SETTINGS, lane=lane)
    for item_id in ids:
        producer.send(parse_event({"type": "item_upsert", "item_id": item_id, "title": f"book {item_id}", **fields}))


def committed(worker: EncoderWorker, lane: str = "live") -> int:
    """Records of a lane the worker's group has committed, over all partitions."""
    consumer = worker.consumers[lane].consumer
    return sum(consumer.committed(SETTINGS.item_topic(lane), p) or 0 for p in range(SETTINGS.partitions))


def published(event_log) -> list:
    """Every change on item-embeddings so far, in order within each item's partition."""
    consumer = event_log.consumer([SETTINGS.topic_item_embeddings], f"check-{uuid.uuid4().hex}")
    return [change_from_json(r.value) for r in drain(consumer, quiet=0.1)]


def test_offsets_are_committed_only_once_the_publishes_are_acknowledged(event_log, redis_server):
    worker = new_worker(event_log, redis_server)
    send_items(event_log, ["1", "2", "3"])
    changes = worker.process(worker.next_batch(threading.Event()))
    assert {c.item_id for c in changes} == {"1", "2", "3"}
    assert worker.store.item_count() == 3  # written ...
    published = drain(event_log.consumer([SETTINGS.topic_item_embeddings], "check"), quiet=0.1)
    assert {change_from_json(r.value).item_id for r in published} == {"1", "2", "3"}  # ... and sent
    worker.settle(block=False)
    assert committed(worker) == 0  # but not acknowledged: nothing committed
    worker.producer.acknowledge()
    worker.settle(block=False)
    assert committed(worker) == 3


def test_a_failed_publish_raises_and_its_batch_is_processed_again(event_log, redis_server):
    worker = new_worker(event_log, redis_server)
    send_items(event_log, ["1", "2", "3"])
    worker.process(worker.next_batch(threading.Event()))
    worker.producer.acknowledge(failure=RuntimeError("broker said no"))
    with pytest.raises(RuntimeError, match="publishing to item-embeddings failed"):
        worker.settle(block=False)
    assert committed(worker) == 0
    worker.close()

    second = new_worker(event_log, redis_server, held=False)  # the same group, after a restart
    batch = second.next_batch(threading.Event())
    assert sorted(event.item_id for _, event in batch.events) == ["1", "2", "3"]  # delivered again
    second.process(batch)
    second.settle(block=True)
    assert committed(second) == 3 and second.store.item_count() == 3


def test_the_window_of_unacknowledged_batches_is_bounded(event_log, redis_server):
    worker = new_worker(event_log, redis_server)
    for n in range(MAX_UNCONFIRMED):
        send_items(event_log, [f"{n}-a"])
        worker.process(worker.next_batch(threading.Event()))
    send_items(event_log, ["last"])
    batch = worker.next_batch(threading.Event())
    one_more = threading.Thread(target=worker.process, args=(batch,))
    one_more.start()
    one_more.join(0.5)
    assert one_more.is_alive(), "a batch past the window did not wait for acknowledgements"
    worker.producer.acknowledge()
    one_more.join(10)
    assert not one_more.is_alive()
    assert committed(worker) == MAX_UNCONFIRMED + 1


def test_nothing_is_committed_while_redis_is_away_and_a_stop_leaves_the_batch_for_later(
        event_log, redis_server, caplog):
    worker = new_worker(event_log, redis_server, held=False)
    send_items(event_log, ["1", "2"])
    redis_server.connected = False
    stop = threading.Event()
    running = threading.Thread(target=worker.run, args=(stop,))
    running.start()
    wait_for(lambda: "Redis unavailable" in caplog.text, what="the worker retrying its batch")
    assert committed(worker) == 0
    stop.set()
    running.join(10)
    assert not running.is_alive(), "the worker did not stop while Redis was away"
    assert committed(worker) == 0  # the batch in hand was not written: not committed either
    worker.close()

    redis_server.connected = True
    second = new_worker(event_log, redis_server, held=False)
    second.process(second.next_batch(threading.Event()))
    second.settle(block=True)
    assert second.store.item_count() == 2 and committed(second) == 2


def test_the_live_lane_is_drained_first_and_cuts_the_bulk_batches(event_log, redis_server):
    worker = new_worker(event_log, redis_server, held=False)
    send_items(event_log, [f"bulk-{n}" for n in range(40)], lane="bulk")
    send_items(event_log, ["live-1", "live-2", "live-3"])
    stop = threading.Event()
    first = worker.next_batch(stop)
    assert first.lane == "live" and sorted(e.item_id for _, e in first.events) == ["live-1", "live-2", "live-3"]
    worker.process(first)
    # Live events flowing and no bulk encoding measured yet: the smallest bulk slice.
    second = worker.next_batch(stop)
    assert second.lane == "bulk" and len(second.events) == 1
    worker.process(second)
    send_items(event_log, ["live-4"])  # arrives while the bulk backlog waits: it goes next
    third = worker.next_batch(stop)
    assert third.lane == "live" and [e.item_id for _, e in third.events] == ["live-4"]
    worker.process(third)
    # bulk_slice_ms bounds a bulk batch's encoding time while live events flow ...
    worker._bulk_item_s = SETTINGS.bulk_slice_ms / 1000 / 2
    assert worker.bulk_limit() == 2
    # ... and once the live lane is quiet, bulk batches are max_batch again.
    worker._live_seen -= LIVE_QUIET_S + 0.1
    assert worker.bulk_limit() == SETTINGS.max_batch
    batch = worker.next_batch(stop)
    assert batch.lane == "bulk" and len(batch.events) == SETTINGS.max_batch
    worker.process(batch)
    while worker.consumers["bulk"].lag():
        worker.process(worker.next_batch(stop))
    worker.settle(block=True)
    assert worker.store.item_count() == 44
    assert committed(worker, "live") == 4 and committed(worker, "bulk") == 40
    assert {c.lane for c in published(event_log) if c.item_id.startswith("bulk")} == {"bulk"}


@pytest.mark.parametrize("order", [("live", "bulk"), ("bulk", "live")], ids=["live-first", "bulk-first"])
def test_an_older_backfill_event_never_overwrites_a_live_update_whichever_lane_comes_last(
        event_log, redis_server, order):
    worker = new_worker(event_log, redis_server, held=False)
    versions = {"live": {"title": "live edit", "ts": 200.0}, "bulk": {"title": "backfill", "ts": 100.0}}
    for lane in order:  # each lane's event in a batch of its own, in this order
        send_items(event_log, ["x"], lane=lane, **versions[lane])
        worker.process(worker.next_batch(threading.Event()))
    assert worker.store.items_metadata(["x"])[0]["title"] == "live edit"
    np.testing.assert_array_equal(worker.store.item_embeddings(["x"])["x"], HashingEncoder(16).encode(["live edit"])[0])
    newest = [c for c in published(event_log) if c.item_id == "x"][-1]
    assert newest.metadata["title"] == "live edit" and newest.lane == "live"
    # A newer backfill event does win: versions decide, not lanes.
    send_items(event_log, ["x"], lane="bulk", title="re-encoded", ts=300.0)
    worker.process(worker.next_batch(threading.Event()))
    assert worker.store.items_metadata(["x"])[0]["title"] == "re-encoded"


def test_a_bad_record_on_either_lane_is_dead_lettered_and_committed(event_log, redis_server):
    worker = new_worker(event_log, redis_server, held=False)
    raw = event_log.producer()
    for lane in ("live", "bulk"):
        raw.send(SETTINGS.item_topic(lane), b"not json", key="k")
        raw.send(SETTINGS.item_topic(lane), parse_event({"type": "interaction", "user_id": "u", "item_id": "1",
                                                         "kind": "read"}).to_json(), key="u")
    send_items(event_log, ["ok"], lane="bulk")
    batch = worker.next_batch(threading.Event())
    assert batch.lane == "bulk" and [e.item_id for _, e in batch.events] == ["ok"]
    worker.process(batch)
    worker.settle(block=True)
    letters = drain(event_log.consumer([SETTINGS.topic_dead_letter], "letters"), quiet=0.1)
    assert len(letters) == 4
    assert committed(worker, "live") == 2 and committed(worker, "bulk") == 3
