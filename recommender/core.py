"""The recommender core, testable without HTTP: similar items, per-user picks, event intake.

`Recommender` answers from the in-memory FAISS index (`ItemIndex`) and Redis (`Store`: metadata,
profiles, seen sets); every answer carries its per-stage latency. `IndexUpdater` bootstraps the
index from Redis and keeps it fresh from the `item-embeddings` topic (read by every replica with a
group of its own, from the beginning: the topic is compacted and the index is versioned, so
old changes are no-ops and nothing between bootstrap and subscription is missed).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from ingest.eventlog import EventLog, EventProducer
from ingest.schema import Event, InvalidEvent, Limits, change_from_json, parse_event, topic_for
from ingest.settings import Settings
from recommender.index import ItemIndex
from recommender.metrics import Metrics, StageTimer
from recommender.store import Store

log = logging.getLogger("recommender")
MAX_K = 100


class UnknownItem(LookupError):
    pass


@dataclass
class Answer:
    items: list[dict]
    latency_ms: dict[str, float]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"items": self.items, "latency_ms": self.latency_ms, **self.extra}


class Recommender:
    def __init__(self, store: Store, index: ItemIndex, producer: EventProducer, settings: Settings,
                 metrics: Metrics | None = None):
        self.store = store
        self.index = index
        self.producer = producer
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.metrics = metrics or Metrics()
        self.started = time.time()

    # -- queries ------------------------------------------------------------------------------
    def similar(self, item_id: str, k: int = 10) -> Answer:
        timer = StageTimer()
        with timer.stage("lookup"):
            vector = self.index.vector(item_id)
        if vector is None:
            raise UnknownItem(f"unknown item {item_id!r}")
        with timer.stage("search"):
            hits = self.index.search(vector, k, exclude={item_id})
        with timer.stage("hydrate"):
            items = self._hydrate(hits)
        return self._answer("similar", items, timer)

    def recommend(self, user_id: str, k: int = 10) -> Answer:
        timer = StageTimer()
        with timer.stage("profile"):
            profile = self.store.user_profile(user_id)
        query = profile.vector
        with timer.stage("search"):
            pending = [v for v in (self.index.vector(p) for p in profile.pending) if v is not None]
            if pending:
                query = sum(pending, np.zeros_like(pending[0]) if query is None else query)
            if query is None or not np.any(query):
                hits = None
            else:
                hits = self.index.search(query / np.linalg.norm(query), k, exclude=profile.seen)
        if hits is None:  # nothing to go on yet: the most popular unseen items
            with timer.stage("popular"):
                # Extra candidates: the most popular books may not all be indexed yet.
                hits = [(i, s) for i, s in self.store.popular(k + 200, exclude=profile.seen)
                        if i in self.index][:k]
            strategy = "popular"
        else:
            strategy = "profile"
            with timer.stage("explain"):
                because = self._nearest_seen(hits, profile.recent)
        with timer.stage("hydrate"):
            items = self._hydrate(hits)
        if strategy == "profile":
            reasons = sorted(set(because.values()))  # only the books named, not every recent one
            titles = dict(zip(reasons, self._titles(reasons), strict=True))
            for item in items:
                reason = because.get(item["item_id"])
                if reason:
                    item["because"] = {"item_id": reason, "title": titles.get(reason)}
        return self._answer("recommendations", items, timer,
                            {"user_id": user_id, "strategy": strategy, "cold_start": strategy == "popular",
                             "seen_count": len(profile.seen)})

    def _nearest_seen(self, hits: list[tuple[str, float]], recent: list[str]) -> dict[str, str]:
        """For each result, the user's recent book it is closest to: the 'why' of a pick."""
        recent = [r for r in recent if r in self.index][:20]
        if not recent or not hits:
            return {}
        seen_vecs = np.stack([self.index.vector(r) for r in recent])
        hit_vecs = np.stack([self.index.vector(i) for i, _ in hits if i in self.index] or [seen_vecs[0]])
        nearest = (hit_vecs @ seen_vecs.T).argmax(axis=1)
        return {i: recent[n] for (i, _), n in zip(hits, nearest, strict=False)}

    def _titles(self, item_ids: list[str]) -> list[str | None]:
        return [m["title"] if m else None for m in self.store.items_metadata(item_ids)]

    def _hydrate(self, hits: list[tuple[str, float]]) -> list[dict]:
        metadata = self.store.items_metadata([i for i, _ in hits])
        return [{"item_id": item_id, "score": round(score, 5), **meta}
                for (item_id, score), meta in zip(hits, metadata, strict=True) if meta is not None]

    def _answer(self, endpoint: str, items: list[dict], timer: StageTimer, extra: dict | None = None) -> Answer:
        latency = timer.finish()
        self.metrics.observe_query(endpoint, latency)
        return Answer(items, latency, extra or {})

    # -- intake ---------------------------------------------------------------------------------
    def submit(self, raw: dict) -> Event:
        """Validates an event (InvalidEvent on bad input), fills id/timestamp, and produces it."""
        try:
            event = parse_event(raw, self.limits)
        except InvalidEvent:
            self.metrics.events_rejected.inc()
            raise
        self.producer.send(event)
        self.producer.flush()
        self.metrics.events_submitted.labels(event.type).inc()
        return event

    def health(self) -> dict:
        try:
            redis_ok = self.store.ping()
        except Exception:  # any Redis failure means "not healthy", with the reason logged
            log.exception("Redis health check failed")
            redis_ok = False
        self.metrics.index_size.set(len(self.index))
        return {"status": "ok" if redis_ok else "degraded", "index_size": len(self.index),
                "redis": redis_ok, "encoder_topic": self.settings.topic_item_embeddings,
                "uptime_s": round(time.time() - self.started, 1)}

    def topic_of(self, event: Event) -> str:
        return topic_for(event, self.settings)


class IndexUpdater:
    """Bootstraps the index from Redis, then applies `item-embeddings` as it arrives."""

    def __init__(self, event_log: EventLog, store: Store, index: ItemIndex, settings: Settings,
                 metrics: Metrics, group: str | None = None):
        self.store = store
        self.index = index
        self.metrics = metrics
        # A group of its own per replica: every replica must see every change.
        self.topic = settings.topic_item_embeddings
        self.consumer = event_log.consumer([self.topic], group or f"recommender-{uuid.uuid4().hex[:12]}")
        self.ready = threading.Event()

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
        records = self.consumer.poll(max_records=2000, timeout_ms=timeout_ms)
        self.metrics.report_lag(self.topic, self.consumer)
        if not records:
            self.ready.set()  # caught up with the topic
            return 0
        changes = []
        for record in records:
            try:
                changes.append(change_from_json(record.value))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping malformed item-embeddings record at %s[%d]@%d: %s",
                          record.topic, record.partition, record.offset, exc)
        applied = self.index.apply(changes)
        self.metrics.observe_index_update([c.ts for c in applied])
        self.metrics.index_size.set(len(self.index))
        return len(applied)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # keep serving from the index we have; log and go on
                log.exception("index update failed")
                stop.wait(0.5)

    def close(self) -> None:
        self.consumer.close()
