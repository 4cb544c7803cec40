"""The lanes on a real broker: the worker takes live events before a bulk backlog it already has.

The worker runs in-process on a `KafkaLog` (the session broker, this test's topics) with the
embedded store and the hashing encoder; the same behaviour on the in-process log, and the version
rule across lanes, are in test_worker.py.
"""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from encoder.hashing import HashingEncoder
from ingest.eventlog import EventProducer
from ingest.schema import parse_event
from recommender.store import Store
from recommender.worker import EncoderWorker
from tests.eventlogs import wait_assigned

pytestmark = pytest.mark.integration
BULK, LIVE = 600, 5


def test_live_events_are_taken_before_the_bulk_backlog(kafka_log, kafka_settings):
    settings = kafka_settings.model_copy(update={"max_wait_ms": 2})
    worker = EncoderWorker(kafka_log, Store(fakeredis.FakeRedis()), HashingEncoder(16), settings)
    try:
        for lane, consumer in worker.consumers.items():  # both in their groups before anything is sent
            wait_assigned([consumer.consumer], settings.item_topic(lane), settings.partitions)
        for lane, ids in (("bulk", [f"bulk-{n}" for n in range(BULK)]), ("live", [f"live-{n}" for n in range(LIVE)])):
            producer = EventProducer(kafka_log, settings, lane=lane)
            for item_id in ids:
                producer.send(parse_event({"type": "item_upsert", "item_id": item_id, "title": item_id}))
            producer.flush(timeout=30)
        time.sleep(1.0)  # both consumers' fetches have returned: the bulk backlog is there to be taken

        stop, lanes, done = threading.Event(), [], 0
        while done < BULK + LIVE:
            batch = worker.next_batch(stop)
            worker.process(batch)
            lanes += [batch.lane] * len(batch.events)
            done += len(batch.events)
        worker.settle(block=True)
    finally:
        worker.close()
    last_live = max(n for n, lane in enumerate(lanes) if lane == "live")
    assert lanes.count("live") == LIVE and worker.store.item_count() == BULK + LIVE
    # At most one bulk batch (the smallest slice while live events flow) may come first.
    assert last_live < LIVE + settings.max_batch, lanes[:last_live + 1]
