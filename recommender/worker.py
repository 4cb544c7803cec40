"""The encoder worker: item events in, embeddings into Redis and onto `item-embeddings`.

`python -m recommender.worker` reads both lanes of item events (docs/ARCHITECTURE.md): the live lane
`item-events` in the group `encoder-workers`, the bulk lane `item-backfill` in `encoder-workers-bulk`
(several workers share each lane's partitions). It loops over micro-batches:

1. the live lane first: every live event available now, up to `max_batch` (single items when idle,
   no waiting to fill); only when it has none, the bulk lane: up to `max_batch`, waiting at most
   `max_wait_ms` to fill; while live events flow (seen within LIVE_QUIET_S) a bulk batch never
   waits and is cut to about `bulk_slice_ms` of encoding, so that a live event never waits behind a
   large bulk batch;
2. keep the newest event per item; skip upserts older than what Redis holds (no wasted encoding);
3. encode the texts in one call;
4. write metadata + embeddings to Redis in one round trip (a Lua script with the version check:
   older never overwrites newer, whichever lane or worker delivers last), then publish each applied
   change, metadata included, to `item-embeddings`;
5. commit a batch's offsets only once the broker has acknowledged all of its publishes. Neither
   wait is on the critical path: the next batch is polled and encoded meanwhile, at most
   MAX_UNCONFIRMED batches may await acknowledgement before the worker blocks on them, and while
   busy the acknowledged offsets are committed at most every COMMIT_EVERY_S (at once when idle).
   A worker killed at any point re-reads uncommitted events, and the versioned writes make the
   second application a no-op in effect.

Why one consumer per lane rather than one consumer with the bulk partitions paused: kafka-python
keeps one fetch in flight per broker per consumer, so while a live-only fetch waits at the broker
the paused-and-resumed bulk partitions cannot be fetched. With a consumer each, the broker answers
the live consumer's waiting fetch the moment a live event lands, and the bulk consumer keeps its
buffer full; not polling the bulk consumer is what pausing the bulk lane means here. During a live
flood the bulk consumer still takes one record every KEEPALIVE_S, which keeps it in its group.

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
from ingest.eventlog import (
    WORKER_GROUP,
    Delivery,
    EventConsumer,
    EventLog,
    Record,
    ensure_topics,
    open_event_log,
    worker_group,
)
from ingest.schema import ItemChange, ItemDelete, ItemUpsert, change_to_json
from ingest.settings import LANES, Settings, add_settings_flags, settings_from_args
from recommender.stopping import StopRequested, abort_on_signal
from recommender.store import Store, open_redis, retry_while_unavailable, wait_for_redis

log = logging.getLogger("recommender.worker")
MAX_UNCONFIRMED = 4  # batches whose publishes may await acknowledgement (bounded memory)
SETTLE_WAIT_S = 1.0  # longest one wait for acknowledgements lasts before `stop` is checked again
SHUTDOWN_WAIT_S = 2.0  # for the last acknowledgements, and for the profile updater, on the way out
COMMIT_EVERY_S = 0.5  # while busy, acknowledged offsets are committed at most this often
LIVE_QUIET_S = 1.0  # no live event for this long: bulk batches grow back to max_batch
IDLE_POLL_MS = 50  # idle: wait this long for a live event, then look at the bulk lane again
KEEPALIVE_S = 30.0  # during a live flood the bulk lane still gets one record this often
STAGES = ("poll", "versions", "encode", "write", "publish", "commit")


@dataclass
class WorkerStats:
    batches: int = 0
    encoded: int = 0
    applied: int = 0
    skipped_stale: int = 0
    encode_seconds: float = 0.0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))  # bounded history
    lane_batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LANES, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # per stage


@dataclass
class Batch:
    lane: str
    events: list[tuple[Record, ItemUpsert | ItemDelete]]


class EncoderWorker:
    def __init__(self, event_log: EventLog, store: Store, encoder: Encoder, settings: Settings,
                 group: str = WORKER_GROUP):
        self.settings = settings
        self.store = store
        self.encoder = encoder
        self.consumers = {lane: EventConsumer(event_log, settings, [settings.item_topic(lane)],
                                              worker_group(lane, group)) for lane in LANES}
        self.producer = event_log.producer(linger_ms=0)  # publish at once: freshness
        self.stats = WorkerStats()
        self.commit_every_s = COMMIT_EVERY_S
        # (lane, records polled for a batch, deliveries of its publishes), oldest first.
        self._unconfirmed: deque[tuple[str, list[Record], list[Delivery]]] = deque()
        self._ready: dict[str, list[Record]] = {lane: [] for lane in LANES}  # acknowledged, to commit
        self._committed_at = 0.0
        self._live_seen = -LIVE_QUIET_S  # monotonic time of the last live event
        self._bulk_polled = time.monotonic()
        self._bulk_item_s: float | None = None  # encoding time per item of recent bulk batches
        self._stop = threading.Event()  # run()'s, so that the waits of process() can see it

    def next_batch(self, stop: threading.Event) -> Batch | None:
        """The live lane's events if it has any, else the bulk lane's; None once `stop` is set."""
        while not stop.is_set():
            if time.monotonic() - self._bulk_polled > KEEPALIVE_S and (bulk := self._take("bulk", 1, timeout_ms=0)):
                return Batch("bulk", bulk)  # a live flood holds the bulk lane back, but not for ever
            live = self._take("live", self.settings.max_batch, timeout_ms=0)
            if live:
                self._live_seen = time.monotonic()
                return Batch("live", live)
            live_flows = time.monotonic() - self._live_seen <= LIVE_QUIET_S
            bulk = self._take("bulk", self.bulk_limit(), timeout_ms=0,
                              fill_ms=0.0 if live_flows else self.settings.max_wait_ms)  # never wait then
            if bulk:
                return Batch("bulk", bulk)
            self.settle(block=True)  # idle: nothing to overlap with, confirm and commit now
            live = self._take("live", self.settings.max_batch, timeout_ms=IDLE_POLL_MS)
            if live:
                self._live_seen = time.monotonic()
                return Batch("live", live)
        return None

    def bulk_limit(self) -> int:
        """max_batch, or while live events flow (seen within LIVE_QUIET_S) as many as encode in
        about bulk_slice_ms."""
        if time.monotonic() - self._live_seen > LIVE_QUIET_S:
            return self.settings.max_batch
        if self._bulk_item_s is None:
            return 1  # not measured yet: the smallest slice
        return max(1, min(self.settings.max_batch, int(self.settings.bulk_slice_ms / 1000 / self._bulk_item_s)))

    def _take(self, lane: str, limit: int, timeout_ms: int, fill_ms: float = 0.0,
              ) -> list[tuple[Record, ItemUpsert | ItemDelete]]:
        """The item events one poll of `lane` returns (after `fill_ms` more to fill up to `limit`)."""
        began = time.perf_counter()
        if lane == "bulk":
            self._bulk_polled = time.monotonic()
        consumer = self.consumers[lane]
        batch = self._items(consumer, consumer.poll(max_records=limit, timeout_ms=timeout_ms))
        if batch and fill_ms > 0:
            deadline = time.monotonic() + fill_ms / 1000
            while len(batch) < limit and (left := deadline - time.monotonic()) > 0:
                batch += self._items(consumer, consumer.poll(max_records=limit - len(batch),
                                                             timeout_ms=max(1, int(left * 1000))))
        if timeout_ms == 0 or batch:  # an idle wait is not work
            self.stats.seconds["poll"] += time.perf_counter() - began
        return batch

    @staticmethod
    def _items(consumer: EventConsumer, polled) -> list[tuple[Record, ItemUpsert | ItemDelete]]:
        items = []
        for record, event in polled:
            if isinstance(event, (ItemUpsert, ItemDelete)):
                items.append((record, event))
            else:
                consumer.dead_letter(record, f"{event.type} event on the item topic")
        return items

    def process(self, batch: Batch) -> list[ItemChange]:
        """Encodes and writes one batch, retrying while Redis is unreachable; then publishes."""
        newest: dict[str, ItemUpsert | ItemDelete] = {}
        for _, event in batch.events:
            seen = newest.get(event.item_id)
            if seen is None or (event.ts, event.event_id) >= (seen.ts, seen.event_id):
                newest[event.item_id] = event
        changes = retry_while_unavailable(self.store, lambda: self._write(list(newest.values()), batch.lane),
                                          log, "the batch", self._stop)
        began = time.perf_counter()
        deliveries = [self.producer.send(self.settings.topic_item_embeddings, change_to_json(change),
                                         key=change.item_id) for change in changes]
        self.stats.seconds["publish"] += time.perf_counter() - began
        self._unconfirmed.append((batch.lane, self.consumers[batch.lane].take_polled(), deliveries))
        self.settle(block=False)
        while len(self._unconfirmed) > MAX_UNCONFIRMED:  # bounded memory: wait for the oldest
            if self._stop.is_set():
                raise StopRequested("stopping while publishes to the broker await acknowledgement")
            self.settle(block=True)
        self.stats.batches += 1
        self.stats.lane_batches[batch.lane] += 1
        self.stats.applied += len(changes)
        self.stats.batch_sizes.append(len(batch.events))
        return changes

    def settle(self, block: bool, wait_s: float = SETTLE_WAIT_S) -> None:
        """Commits the offsets of every leading batch whose publishes are all acknowledged.

        `block` first waits up to `wait_s` for every publish (a full window, idle time, shutdown) and
        commits at once; otherwise what is acknowledged is committed at most every `commit_every_s`.
        A failed publish raises: its offsets stay uncommitted, so the batch is processed again.
        """
        if block:
            try:
                self.producer.flush(wait_s)  # raises if a record could not be delivered
            except TimeoutError:
                pass  # the broker is slow or away: what is acknowledged so far is committed below
        while self._unconfirmed and all(d.done() for d in self._unconfirmed[0][2]):
            lane, records, deliveries = self._unconfirmed.popleft()
            failed = next((d.error() for d in deliveries if d.error() is not None), None)
            if failed is not None:
                raise RuntimeError(f"publishing to {self.settings.topic_item_embeddings} failed: {failed}")
            self._ready[lane].extend(records)
        waiting = {lane for lane, _, _ in self._unconfirmed}
        for lane, consumer in self.consumers.items():
            if lane not in waiting:  # records polled since its last batch (dead letters) come next
                self._ready[lane].extend(consumer.take_polled())
        if not block and time.monotonic() - self._committed_at < self.commit_every_s:
            return
        began = time.perf_counter()
        for lane, consumer in self.consumers.items():
            ready, self._ready[lane] = self._ready[lane], []
            consumer.commit(ready)
        self._committed_at = time.monotonic()
        self.stats.seconds["commit"] += time.perf_counter() - began

    def _write(self, events: list[ItemUpsert | ItemDelete], lane: str) -> list[ItemChange]:
        seconds = self.stats.seconds
        began = time.perf_counter()
        stored = self.store.stored_versions([e.item_id for e in events])
        seconds["versions"] += time.perf_counter() - began
        current = [e for e in events
                   if e.item_id not in stored or (e.ts, e.event_id) >= stored[e.item_id]]
        self.stats.skipped_stale += len(events) - len(current)
        upserts = [e for e in current if isinstance(e, ItemUpsert)]
        embeddings: dict[str, np.ndarray] = {}
        if upserts:
            began = time.perf_counter()
            vectors = self.encoder.encode([e.encoder_text for e in upserts], batch_size=len(upserts))
            took = time.perf_counter() - began
            seconds["encode"] += took
            self.stats.encode_seconds += took
            self.stats.encoded += len(upserts)
            if lane == "bulk":  # what bulk_limit() sizes the slices by
                per_item = took / len(upserts)
                self._bulk_item_s = per_item if self._bulk_item_s is None else 0.7 * self._bulk_item_s + 0.3 * per_item
            embeddings = {e.item_id: v for e, v in zip(upserts, vectors, strict=True)}
        began = time.perf_counter()
        changes = self.store.apply_item_events(
            [(e, embeddings.get(e.item_id) if isinstance(e, ItemUpsert) else None) for e in current], lane)
        seconds["write"] += time.perf_counter() - began
        return changes

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
            for consumer in self.consumers.values():
                consumer.take_polled()  # never committed by the settle below
        self.settle(block=True, wait_s=SHUTDOWN_WAIT_S)

    def close(self) -> None:
        """Leaves the groups and closes the producer, each within the event log's close timeout.

        A publish still unacknowledged then is dropped, which loses nothing: the batch it belongs
        to was not committed, so it is processed again.
        """
        for part in (*self.consumers.values(), self.producer):
            try:
                part.close()
            except Exception as exc:  # whatever the log raises for undelivered records: logged, not fatal
                log.warning("closing %s: %s", type(part).__name__, exc)

    def summary(self) -> str:
        stats = self.stats
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stats.seconds.items())
        return (f"{stats.batches} batches ({', '.join(f'{n} {lane}' for lane, n in stats.lane_batches.items())}), "
                f"{stats.encoded} items encoded; {stages}")


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
            encoder = load_encoder(settings.resolved_encoder, threads=settings.kernel_threads,
                                   kernel_path=settings.kernel_path or None)
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
    log.info("consuming %s", ", ".join(f"{settings.item_topic(lane)} (group {worker_group(lane)})"
                                       for lane in LANES))
    for t in threads:
        t.start()
    worker.run(stop)
    worker.close()
    for t in threads:
        t.join(timeout=SHUTDOWN_WAIT_S)
    event_log.close()
    log.info("stopped after %s", worker.summary())


if __name__ == "__main__":
    main()
