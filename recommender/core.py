"""The recommender core, testable without HTTP: similar items, per-user picks, event intake.

`Recommender` answers from the in-memory FAISS index (`ItemIndex`, which also keeps every searchable
item's metadata: similar items need no Redis round trip) and Redis (`Store`: profiles, seen sets);
every answer carries its per-stage latency. `IndexUpdater` bootstraps the index from Redis and keeps
it fresh from the `item-embeddings` topic (read whole by every replica, in no consumer group, from the
beginning: the topic is compacted and the index is versioned, so old changes are no-ops and nothing
between bootstrap and subscription is missed). `LaneMonitor` measures each lane's backlog at the
encoder workers, which also tells whether the broker answers.

Outages (docs/ARCHITECTURE.md): a request never waits for an unreachable broker or Redis longer than
`Settings.request_timeout_s`; what cannot be answered then raises `Unavailable` (HTTP 503).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ingest.eventlog import EventLog, EventProducer, Undelivered, worker_group
from ingest.schema import Event, InvalidEvent, Limits, change_from_json, parse_event
from ingest.settings import LANES, Settings
from recommender.blend import COREAD_ONLY, DEFAULT_PARAMS, BlendParams, rank
from recommender.index import ItemIndex
from recommender.metrics import Metrics, StageTimer
from recommender.store import Store, UserProfile

log = logging.getLogger("recommender")
MAX_K = 100
SEARCH_THREADS = 4  # content searches of concurrent per-user requests (they share scans: ItemIndex.search)
# When the kept neighbour lists take changes in (recommender/index.py): a flood of them (a backfill)
# waits for a quiet moment, no record for SYNC_QUIET_S (with two replicas merging beside the flood,
# sustained ingest was 35-39% of the encoder alone in four bench.pipeline runs; 51-62% in three once
# merges waited, 61% without lists), for answers that a scan gives meanwhile; a trickle, fewer than
# SYNC_BATCH, is merged once the oldest has waited SYNC_LAG_S. At most SYNC_SLICE per turn, then the topic is
# polled again, so that a change arriving meanwhile waits for one slice at most.
SYNC_QUIET_S = 0.25
SYNC_BATCH = 64
SYNC_LAG_S = 1.0
SYNC_SLICE = 256


class UnknownItem(LookupError):
    pass


class Unavailable(RuntimeError):
    """A dependency did not answer in time; `reason` says what could not be done."""

    def __init__(self, dependency: str, reason: str, retry_after_s: int = 2):
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class Answer:
    items: list[dict]
    latency_ms: dict[str, float]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"items": self.items, "latency_ms": self.latency_ms, **self.extra}


class Recommender:
    def __init__(self, store: Store, index: ItemIndex, producer: EventProducer, settings: Settings,
                 metrics: Metrics | None = None, monitor: LaneMonitor | None = None,
                 blend: BlendParams = DEFAULT_PARAMS):
        """`monitor`: what /health reports about the broker (None: an in-process log, always there);
        `blend`: how per-user picks weigh co-read against content (recommender/blend.py)."""
        self.store = store
        self.index = index
        self.producer = producer
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.metrics = metrics or Metrics()
        self.monitor = monitor
        self.started = time.time()
        self.blend = blend
        self._searches = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="content-search")

    def close(self) -> None:
        """Stops the content-search helper threads (a request in flight finishes first)."""
        self._searches.shutdown(wait=True)

    # -- queries ------------------------------------------------------------------------------
    def similar(self, item_id: str, k: int = 10) -> Answer:
        """The k nearest items, hydrated from the index (no Redis round trip, see `_metadata`)."""
        timer = StageTimer()
        self._lookup(item_id, timer)
        with timer.stage("search"):
            hits = self.index.neighbours(item_id, k)
        with timer.stage("hydrate"):
            items = self._hydrate(hits)
        return self._answer("similar", items, timer)

    def similar_by(self, item_id: str, k: int = 10, signal: str = "blend") -> Answer:
        """Similar items by "coread" (the item's co-read neighbours by cosine) or by "blend" (the
        per-user blend with the item as the only book read); "content" is `similar`."""
        if signal == "content":
            return self.similar(item_id, k)
        timer = StageTimer()
        vector = self._lookup(item_id, timer)
        with timer.stage("search"):
            params = self.blend if signal == "blend" else COREAD_ONLY
            hits = self.index.search(vector, params.content_candidates, exclude={item_id}) \
                if params.content_candidates else []
            coread, support = self._coread([item_id], {item_id}, params, hits)
            picks = rank(coread, support, hits, lambda ids: self._content_of(vector, ids), params, k)
        with timer.stage("hydrate"):
            items = self._hydrate([(p.item_id, p.score) for p in picks])
        return self._answer("similar", items, timer, {"signal": signal})

    def _lookup(self, item_id: str, timer: StageTimer) -> np.ndarray:
        with timer.stage("lookup"):
            vector = self.index.vector(item_id)
        if vector is None:
            raise UnknownItem(f"unknown item {item_id!r}")
        return vector

    def recommend(self, user_id: str, k: int = 10) -> Answer:
        """The blend of recommender/blend.py over the user's co-read and content candidates; the
        popular list while there is nothing to go on. Seen books never appear."""
        timer = StageTimer()
        with timer.stage("profile"):
            profile = self.store.user_profile(user_id)
            recent = profile.recent[:self.blend.recent_books]
        query = self._profile_query(profile)
        # The content search runs on a helper thread while Redis computes the co-read scores: FAISS
        # releases the GIL, and the co-read call mostly waits on Redis (measured side by side on
        # real Redis: p50 3.6 -> 2.8 ms for the two). "search" is then the wait for its result.
        search = None if query is None else self._searches.submit(
            self.index.search, query, self.blend.content_candidates, profile.seen)
        with timer.stage("coread"):
            coread, support = self._coread(recent, profile.seen, self.blend)
        with timer.stage("search"):
            hits = [] if search is None else search.result()
        with timer.stage("counts"):  # the content candidates' interaction counts the co-read call lacked
            support.update(self.store.interaction_counts([j for j, _ in hits if j not in support]))
        with timer.stage("blend"):
            picks = rank(coread, support, hits, lambda ids: self._content_of(query, ids), self.blend, k)
        if not picks:  # nothing to go on yet: the most popular unseen items
            with timer.stage("popular"):
                # Extra candidates: the most popular books may not all be indexed yet.
                popular = [(i, s) for i, s in self.store.popular(k + 200, exclude=profile.seen)
                           if i in self.index][:k]
            with timer.stage("hydrate"):
                items = self._hydrate(popular)
            strategy = "popular"
        else:
            with timer.stage("explain"):
                nearest = self._nearest_seen([(p.item_id, p.score) for p in picks if p.because is None], recent)
                because = {p.item_id: (p.because or nearest.get(p.item_id), p.signal) for p in picks}
            with timer.stage("hydrate"):
                items = self._hydrate([(p.item_id, p.score) for p in picks])
                books = sorted({b for b, _ in because.values() if b})  # only the books named
                titles = dict(zip(books, self._titles(books), strict=True))
            for item in items:
                book, signal = because[item["item_id"]]
                if book:
                    item["because"] = {"item_id": book, "title": titles.get(book), "signal": signal}
            strategy = "hybrid"
        return self._answer("recommendations", items, timer,
                            {"user_id": user_id, "strategy": strategy, "cold_start": strategy == "popular",
                             "seen_count": len(profile.seen)})

    def _coread(self, recent: list[str], exclude: set[str], params: BlendParams,
                hits: list[tuple[str, float]] = ()) -> tuple[dict[str, tuple[float, str]], dict[str, float]]:
        """The co-read candidates of `recent` that are searchable (a co-read neighbour may be deleted
        or not encoded yet), and the counts blend needs (of `hits` too)."""
        coread, support = self.store.coread_scores(recent, exclude, params.coread_candidates,
                                                   also_count=[j for j, _ in hits], k=params.coread_per_book)
        return {j: v for j, v in coread.items() if j in self.index}, support

    def _profile_query(self, profile: UserProfile) -> np.ndarray | None:
        """The unit profile vector, with the books read before they were encoded folded in."""
        query = profile.vector
        pending = [v for v in (self.index.vector(p) for p in profile.pending) if v is not None]
        if pending:
            query = sum(pending, np.zeros_like(pending[0]) if query is None else query)
        if query is None or not np.any(query):
            return None
        return query / np.linalg.norm(query)

    def _content_of(self, query: np.ndarray | None, item_ids: list[str]) -> dict[str, float]:
        if query is None:
            return {}
        vectors = {j: v for j in item_ids if (v := self.index.vector(j)) is not None}
        return {j: float(v @ query) for j, v in vectors.items()}

    def _nearest_seen(self, hits: list[tuple[str, float]], recent: list[str]) -> dict[str, str]:
        """For each result, the user's recent book it is closest to: the 'why' of a pick."""
        recent = [r for r in recent if r in self.index][:20]
        hits = [h for h in hits if h[0] in self.index]
        if not recent or not hits:
            return {}
        seen_vecs = np.stack([self.index.vector(r) for r in recent])
        hit_vecs = np.stack([self.index.vector(i) for i, _ in hits])
        nearest = (hit_vecs @ seen_vecs.T).argmax(axis=1)
        return {i: recent[n] for (i, _), n in zip(hits, nearest, strict=True)}

    def _titles(self, item_ids: list[str]) -> list[str | None]:
        metadata = self._metadata(item_ids)
        return [metadata[i]["title"] if i in metadata else None for i in item_ids]

    def _hydrate(self, hits: list[tuple[str, float]]) -> list[dict]:
        metadata = self._metadata([i for i, _ in hits])
        return [{"item_id": item_id, "score": round(score, 5), **metadata[item_id]}
                for item_id, score in hits if item_id in metadata]

    def _metadata(self, item_ids: list[str]) -> dict[str, dict]:
        """From the index; from Redis only for searchable items whose change carried none (written
        before metadata travelled with the changes). Unknown and deleted items are left out."""
        found = self.index.metadata(item_ids)
        missing = [i for i in item_ids if i not in found and i in self.index]
        if missing:
            found.update((i, m) for i, m in zip(missing, self.store.items_metadata(missing), strict=True)
                         if m is not None)
        return found

    def _answer(self, endpoint: str, items: list[dict], timer: StageTimer, extra: dict | None = None) -> Answer:
        latency = timer.finish()
        self.metrics.observe_query(endpoint, latency)
        return Answer(items, latency, extra or {})

    # -- intake ---------------------------------------------------------------------------------
    def submit(self, raw: dict | bytes) -> Event:
        """Validates an event (InvalidEvent on bad input), fills id/timestamp, produces it to the live
        lane and returns once the broker acknowledged it; Unavailable when it did not within
        `request_timeout_s` (the event is then not accepted: a client resends it, best with the
        same event_id, which makes a resend of an event that did arrive a no-op)."""
        try:
            event = parse_event(raw, self.limits)
        except InvalidEvent:
            self.metrics.events_rejected.inc()
            raise
        timeout = self.settings.request_timeout_s
        began = time.monotonic()
        try:
            delivery = self.producer.send(event)  # may block (the broker's metadata), as long as timeout
            delivery.wait(max(0.0, timeout - (time.monotonic() - began)))  # the two together: timeout
        except (TimeoutError, Undelivered) as exc:
            self.metrics.events_unavailable.inc()
            raise Unavailable("kafka", f"the broker did not acknowledge the event within {timeout:g} s "
                                       f"({exc}); it was not accepted") from None
        self.metrics.events_submitted.labels(event.type).inc()
        return event

    def health(self) -> dict:
        """Each dependency's state; "degraded" when one is down. Waits at most `request_timeout_s`."""
        try:
            self.store.ping()
            redis = {"ok": True}
        except Exception as exc:  # any Redis failure means "not healthy", with the reason
            log.warning("Redis health check failed: %s", exc)
            redis = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        kafka = self.monitor.kafka_state() if self.monitor else {"ok": True, "detail": "in-process event log"}
        self.metrics.index_size.set(len(self.index))
        ok = redis["ok"] and kafka["ok"]
        return {"status": "ok" if ok else "degraded", "index_size": len(self.index),
                "neighbour_lists_behind": self.index.unsynced(),
                "redis": redis["ok"], "kafka": kafka["ok"], "dependencies": {"redis": redis, "kafka": kafka},
                "encoder_topic": self.settings.topic_item_embeddings,
                "uptime_s": round(time.time() - self.started, 1)}

    def topic_of(self, event: Event) -> str:
        return self.producer.topic(event)


class LaneMonitor:
    """Each lane's backlog at the encoder workers (records their group has not committed), measured
    every `every_s` on a thread of its own: the same broker call says whether the broker answers
    (a call that hangs only ages the last success)."""

    def __init__(self, event_log: EventLog, settings: Settings, metrics: Metrics, every_s: float = 1.0,
                 stale_s: float = 3.0):
        self.event_log = event_log
        self.topics = {lane: settings.item_topic(lane) for lane in LANES}
        self.metrics = metrics
        self.every_s = every_s
        self.stale_s = stale_s  # no answer for this long: the broker is reported down
        self._last_ok: float | None = None
        self._last_error = "not measured yet"

    def check(self) -> None:
        try:
            lags = {lane: self.event_log.backlog(worker_group(lane), [topic])[topic]
                    for lane, topic in self.topics.items()}
        except Exception as exc:  # whatever the log raises when the broker does not answer
            self._last_error = f"{type(exc).__name__}: {exc}"
            return
        self._last_ok = time.monotonic()
        self.metrics.report_backlog(lags)

    def kafka_state(self) -> dict:
        if self._last_ok is not None and time.monotonic() - self._last_ok <= self.stale_s:
            return {"ok": True}
        return {"ok": False, "detail": f"the broker has not answered for over {self.stale_s:g} s "
                                       f"(last error: {self._last_error})"}

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every_s):
            self.check()


class IndexUpdater:
    """Bootstraps the index from Redis, then applies `item-embeddings` as it arrives."""

    def __init__(self, event_log: EventLog, store: Store, index: ItemIndex, settings: Settings,
                 metrics: Metrics):
        self.store = store
        self.index = index
        self.metrics = metrics
        # A reader, in no group: every replica must see every change.
        self.topic = settings.topic_item_embeddings
        self.consumer = event_log.reader([self.topic])
        self.ready = threading.Event()
        self._unsynced_since: float | None = None  # monotonic time the lists fell behind
        self._records_at = time.monotonic()  # of the last poll that returned records

    def bootstrap(self) -> int:
        batch = []
        for change in self.store.iter_item_changes():
            batch.append(change)
            if len(batch) == 1000:
                self.index.apply(batch)
                batch = []
        self.index.apply(batch)
        self.metrics.index_size.set(len(self.index))
        log.info("index bootstrapped from Redis: %d items", len(self.index))
        return len(self.index)

    def step(self, timeout_ms: int = 100) -> int:
        sync_in_s = self._sync_in_s()
        if sync_in_s is not None:  # wait no longer than until the lists are due
            timeout_ms = min(timeout_ms, math.ceil(sync_in_s * 1000))
        records = self.consumer.poll(max_records=2000, timeout_ms=timeout_ms)
        self.metrics.report_lag(self.topic, self.consumer)
        if not records:
            # An empty poll alone is no proof: a fresh reader's first polls return nothing while it
            # looks up its offsets, with the whole topic still ahead (the index was then "ready"
            # at 4,023 of 5,300 items).
            if not self.ready.is_set() and self.consumer.lag() == 0:
                self.ready.set()  # caught up with the topic
            if self._sync_in_s() == 0:  # a slice of the kept lists' catch-up, then look again
                self.index.sync_neighbours(SYNC_SLICE)
            return 0
        self._records_at = time.monotonic()
        changes = []
        for record in records:
            try:
                changes.append(change_from_json(record.value))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping malformed item-embeddings record at %s[%d]@%d: %s",
                          record.topic, record.partition, record.offset, exc)
        applied = self.index.apply(changes)
        self.metrics.observe_index_update(applied)
        self.metrics.index_size.set(len(self.index))
        return len(applied)

    def _sync_in_s(self) -> float | None:
        """Seconds until the kept lists are due to take changes in (0: now); None: up to date."""
        unsynced = self.index.unsynced()
        if not unsynced:
            self._unsynced_since = None
            return None
        now = time.monotonic()
        if self._unsynced_since is None:
            self._unsynced_since = now
        due = self._records_at + SYNC_QUIET_S
        if unsynced < SYNC_BATCH:
            due = min(due, self._unsynced_since + SYNC_LAG_S)
        return max(0.0, due - now)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # keep serving from the index we have; log and go on
                log.exception("index update failed")
                stop.wait(0.5)

    def close(self) -> None:
        self.consumer.close()
