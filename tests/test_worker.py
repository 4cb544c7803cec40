"""The encoder worker's commit ordering, on the in-process log and the embedded store.

Offsets of `item-events` are committed only after the Redis writes of their batch and only once
every `item-embeddings` publish of it is acknowledged. The publishes go through `HeldProducer`, a
producer that appends at once but acknowledges only when the test says so (a slow broker), and
Redis is taken away with fakeredis's `connected` switch.
"""

from __future__ import annotations

import threading

import fakeredis
import pytest

from encoder.hashing import HashingEncoder
from ingest.eventlog import EventProducer, ensure_topics
from ingest.memory_log import InProcessLog
from ingest.schema import change_from_json, parse_event
from ingest.settings import Settings
from recommender.store import Store
from recommender.worker import MAX_UNCONFIRMED, EncoderWorker
from tests.eventlogs import drain
from tests.waiting import wait_for

SETTINGS = Settings(kafka_bootstrap="", redis_url="", max_batch=4, max_wait_ms=2)
TOPIC = SETTINGS.topic_item_events


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


def new_worker(event_log, redis_server, held: bool = True) -> EncoderWorker:
    worker = EncoderWorker(event_log, Store(fakeredis.FakeRedis(server=redis_server)), HashingEncoder(16), SETTINGS)
    if held:
        worker.producer = HeldProducer(event_log)
    return worker


def send_items(event_log, ids) -> None:
    producer = EventProducer(event_log, SETTINGS)
    for item_id in ids:
        producer.send(parse_event({"type": "item_upsert", "item_id": item_id, "title": f"book {item_id}"}))


def committed(worker: EncoderWorker) -> int:
    """Records of item-events the worker's group has committed, over all partitions."""
    consumer = worker.consumer.consumer
    return sum(consumer.committed(TOPIC, p) or 0 for p in range(SETTINGS.partitions))


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
    assert sorted(event.item_id for _, event in batch) == ["1", "2", "3"]  # delivered again
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
