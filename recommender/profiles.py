"""The profile updater: `user-events` in, each user's seen set, recent items and profile in Redis.

A consumer group on `user-events` (keyed by user, so one updater owns a user's events). The
embeddings of the items in a batch are read from Redis in one round trip; `Store` applies each
interaction once (a redelivered one changes nothing), then offsets are committed.
"""

from __future__ import annotations

import logging
import threading

from ingest.eventlog import EventConsumer, EventLog
from ingest.schema import Interaction
from ingest.settings import Settings
from recommender.stopping import StopRequested
from recommender.store import Store, retry_while_unavailable

log = logging.getLogger("recommender.profiles")
PROFILE_GROUP = "profile-updaters"


class ProfileUpdater:
    def __init__(self, event_log: EventLog, store: Store, settings: Settings, group: str = PROFILE_GROUP):
        self.store = store
        self.consumer = EventConsumer(event_log, settings, [settings.topic_user_events], group)
        self.applied = 0

    def step(self, max_records: int = 500, timeout_ms: int = 100, stop: threading.Event | None = None) -> int:
        polled = self.consumer.poll(max_records=max_records, timeout_ms=timeout_ms)
        interactions = []
        for record, event in polled:
            if isinstance(event, Interaction):
                interactions.append(event)
            else:
                self.consumer.dead_letter(record, f"{event.type} event on the user topic")

        def apply() -> int:
            embeddings = self.store.item_embeddings(sorted({e.item_id for e in interactions}))
            return self.store.apply_interactions(interactions, embeddings)

        self.applied += retry_while_unavailable(self.store, apply, log, "the interactions", stop)
        self.consumer.commit()
        return len(interactions)

    def run(self, stop: threading.Event) -> None:
        """Loops until `stop` is set; interactions not written when it stops (Redis away) stay uncommitted."""
        try:
            while not stop.is_set():
                self.step(stop=stop)
        except StopRequested as exc:
            log.warning("%s: left uncommitted", exc)
            self.consumer.take_polled()  # never committed by the commit below
        self.consumer.commit()

    def close(self) -> None:
        self.consumer.close()
