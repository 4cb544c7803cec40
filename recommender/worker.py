"""The encoder worker: item events in, embeddings into Redis and onto `item-embeddings`.

`python -m recommender.worker` joins the `encoder-workers` consumer group on `item-events` (several
workers share the partitions) and loops over micro-batches:

1. poll until `max_batch` events or `max_wait_ms` after the first one (batch efficiency under
   load, low latency when idle);
2. keep the newest event per item; skip upserts older than what Redis holds (no wasted encoding);
3. encode the texts in one call;
4. write metadata + embeddings to Redis in one WATCH/MULTI transaction (older never overwrites
   newer), then publish each applied change to `item-embeddings`;
5. commit a batch's offsets only once the broker has acknowledged all of its publishes. That
   wait is not on the critical path: the next batch is polled and encoded meanwhile, and at most
   MAX_UNCONFIRMED batches may be awaiting acknowledgement before the worker blocks on them.
   A worker killed at any point re-reads uncommitted events, and the versioned writes make the
   second application a no-op in effect.

Redis going away makes the worker wait and retry the same batch; nothing is committed meanwhile.
SIGTERM finishes the batch in hand, commits, and exits; with Redis or the broker away it leaves the
batch in hand uncommitted instead (processed again after a restart) and still exits within 10 s:
no wait for a dependency is unbounded once the worker is stopping. The same process runs the
profile updater (`recommender.profiles`) on `user-events` unless `--no-profiles`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from encoder import Encoder, load_encoder
from ingest.eventlog import Delivery, EventConsumer, EventLog, Record, ensure_topics, open_event_log
from ingest.schema import ItemChange, ItemDelete, ItemUpsert, change_to_json
from ingest.settings import Settings, add_settings_flags, settings_from_args
from recommender.stopping import StopRequested, abort_on_signal
from recommender.store import Store, open_redis, retry_while_unavailable, wait_for_redis

log = logging.getLogger("recommender.worker")
WORKER_GROUP = "encoder-workers"
MAX_UNCONFIRMED = 4  # batches whose publishes may await acknowledgement (bounded memory)
SETTLE_WAIT_S = 1.0  # longest one wait for acknowledgements lasts before `stop` is checked again
SHUTDOWN_WAIT_S = 2.0  # for the last acknowledgements, and for the profile updater, on the way out


@dataclass
class WorkerStats:
    batches: int = 0
    encoded: int = 0
    applied: int = 0
    skipped_stale: int = 0
    encode_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class EncoderWorker:
    def __init__(self, event_log: EventLog, store: Store, encoder: Encoder, settings: Settings,
                 group: str = WORKER_GROUP, metrics=None):
        self.settings = settings
        self.metrics = metrics  # recommender.metrics.Metrics when in the service's process
        self.store = store
        self.encoder = encoder
        self.consumer = EventConsumer(event_log, settings, [settings.topic_item_events], group)
        self.producer = event_log.producer(linger_ms=0)  # publish at once: freshness
        self.stats = WorkerStats()
        # (records polled for a batch, deliveries of its publishes), oldest first.
        self._unconfirmed: deque[tuple[list[Record], list[Delivery]]] = deque()
        self._stop = threading.Event()  # run()'s, so that the waits of process() can see it

    def next_batch(self, stop: threading.Event) -> list[tuple[Record, ItemUpsert | ItemDelete]]:
        """Waits for a first event, then at most max_wait_ms for the batch to fill."""
        batch: list = []
        deadline = None
        while len(batch) < self.settings.max_batch and not stop.is_set():
            if deadline is None:
                timeout_ms = 100
            else:
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
            got = self.consumer.poll(max_records=self.settings.max_batch - len(batch), timeout_ms=timeout_ms)
            if self.metrics is not None:
                self.metrics.report_lag(self.settings.topic_item_events, self.consumer)
            for record, event in got:
                if isinstance(event, (ItemUpsert, ItemDelete)):
                    batch.append((record, event))
                else:
                    self.consumer.dead_letter(record, f"{event.type} event on the item topic")
            if batch and deadline is None:
                deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            if not batch:
                self.settle(block=True)  # idle: nothing to overlap with, confirm and commit now
        return batch

    def process(self, batch: list[tuple[Record, ItemUpsert | ItemDelete]]) -> list[ItemChange]:
        """Encodes and writes one batch, retrying while Redis is unreachable; then publishes."""
        newest: dict[str, ItemUpsert | ItemDelete] = {}
        for _, event in batch:
            seen = newest.get(event.item_id)
            if seen is None or (event.ts, event.event_id) >= (seen.ts, seen.event_id):
                newest[event.item_id] = event
        changes = retry_while_unavailable(self.store, lambda: self._write(list(newest.values())), log,
                                          "the batch", self._stop)
        deliveries = [self.producer.send(self.settings.topic_item_embeddings, change_to_json(change),
                                         key=change.item_id) for change in changes]
        self._unconfirmed.append((self.consumer.take_polled(), deliveries))
        self.settle(block=False)
        while len(self._unconfirmed) > MAX_UNCONFIRMED:  # bounded memory: wait for the oldest
            if self._stop.is_set():
                raise StopRequested("stopping while publishes to the broker await acknowledgement")
            self.settle(block=True)
        self.stats.batches += 1
        self.stats.applied += len(changes)
        self.stats.batch_sizes.append(len(batch))
        del self.stats.batch_sizes[:-1000]  # bounded history
        return changes

    def settle(self, block: bool, wait_s: float = SETTLE_WAIT_S) -> None:
        """Commits the offsets of every leading batch whose publishes are all acknowledged.

        `block` first waits up to `wait_s` for every publish (a full window, idle time, shutdown).
        A failed publish raises: its offsets stay uncommitted, so the batch is processed again.
        """
        if block:
            try:
                self.producer.flush(wait_s)  # raises if a record could not be delivered
            except TimeoutError:
                pass  # the broker is slow or away: what is acknowledged so far is committed below
        ready: list[Record] = []
        while self._unconfirmed and all(d.done() for d in self._unconfirmed[0][1]):
            records, deliveries = self._unconfirmed.popleft()
            failed = next((d.error() for d in deliveries if d.error() is not None), None)
            if failed is not None:
                raise RuntimeError(f"publishing to {self.settings.topic_item_embeddings} failed: {failed}")
            ready.extend(records)
        ready.extend(self.consumer.take_polled() if not self._unconfirmed else [])
        self.consumer.commit(ready)

    def _write(self, events: list[ItemUpsert | ItemDelete]) -> list[ItemChange]:
        stored = self.store.stored_versions([e.item_id for e in events])
        current = [e for e in events
                   if e.item_id not in stored or (e.ts, e.event_id) >= stored[e.item_id]]
        self.stats.skipped_stale += len(events) - len(current)
        upserts = [e for e in current if isinstance(e, ItemUpsert)]
        embeddings: dict[str, np.ndarray] = {}
        if upserts:
            began = time.perf_counter()
            vectors = self.encoder.encode([e.encoder_text for e in upserts], batch_size=len(upserts))
            self.stats.encode_seconds += time.perf_counter() - began
            self.stats.encoded += len(upserts)
            embeddings = {e.item_id: v for e, v in zip(upserts, vectors, strict=True)}
        return self.store.apply_item_events(
            [(e, embeddings.get(e.item_id) if isinstance(e, ItemUpsert) else None) for e in current])

    def run(self, stop: threading.Event) -> None:
        """Loops until `stop` is set. The batch in hand is finished and committed, unless Redis
        or the broker is away: then it is left uncommitted, to be processed again."""
        self._stop = stop
        try:
            while not stop.is_set():
                batch = self.next_batch(stop)
                if batch:
                    self.process(batch)
        except StopRequested as exc:
            log.warning("%s: the batch in hand is left uncommitted", exc)
            self.consumer.take_polled()  # never committed by the settle below
        self.settle(block=True, wait_s=SHUTDOWN_WAIT_S)

    def close(self) -> None:
        """Leaves the group and closes the producer, each within the event log's close timeout.

        A publish still unacknowledged then is dropped, which loses nothing: the batch it belongs
        to was not committed, so it is processed again.
        """
        for part in (self.consumer, self.producer):
            try:
                part.close()
            except Exception as exc:  # whatever the log raises for undelivered records: logged, not fatal
                log.warning("closing %s: %s", type(part).__name__, exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Encode item events into Redis and item-embeddings.")
    add_settings_flags(parser)
    parser.add_argument("--no-profiles", action="store_true", help="do not run the profile updater")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    if settings.embedded_log or settings.embedded_store:
        parser.error("the worker process needs TERNREC_KAFKA_BOOTSTRAP and TERNREC_REDIS_URL "
                     "(embedded mode runs it inside `make demo`)")
    from recommender.profiles import ProfileUpdater

    # A SIGTERM during start-up (broker or Redis not there yet, model loading) ends the worker at
    # once (recommender.stopping); once it runs, a SIGTERM sets `stop` and the loops finish.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    event_log = open_event_log(settings)
    try:
        with abort_on_signal():
            ensure_topics(event_log, settings)
            store = Store(open_redis(settings.redis_url))
            wait_for_redis(store)
            encoder = load_encoder(settings.resolved_encoder)
            log.info("encoder %s (dim %d) loaded", encoder.name, encoder.dim)
            threads = []
            if not args.no_profiles:
                updater = ProfileUpdater(event_log, store, settings)
                threads.append(threading.Thread(target=updater.run, args=(stop,), name="profiles", daemon=True))
            worker = EncoderWorker(event_log, store, encoder, settings)
    except StopRequested as exc:
        log.info("%s", exc)
        event_log.close()
        return
    log.info("consuming %s in group %s", settings.topic_item_events, WORKER_GROUP)
    for t in threads:
        t.start()
    worker.run(stop)
    worker.close()
    for t in threads:
        t.join(timeout=SHUTDOWN_WAIT_S)
    event_log.close()
    log.info("stopped after %d batches, %d items encoded", worker.stats.batches, worker.stats.encoded)


if __name__ == "__main__":
    main()
