"""Wires the components of one process from the settings: the same code for every mode.

Embedded mode (`make demo`): the in-process log and an embedded store, with the encoder worker,
profile updater and index updater as threads beside the HTTP service. Service mode
(`python -m recommender.service` against Kafka and Redis): the index updater only; the workers run
in their own processes (`python -m recommender.worker`).
"""

from __future__ import annotations

import logging
import threading
import time

import faiss
from threadpoolctl import threadpool_limits

from encoder import load_encoder
from ingest.eventlog import EventProducer, ensure_topics, open_event_log
from ingest.settings import Settings
from recommender.core import IndexUpdater, LaneMonitor, Recommender
from recommender.index import ItemIndex
from recommender.metrics import Metrics
from recommender.profiles import ProfileUpdater
from recommender.store import Store, open_redis, wait_for_redis
from recommender.worker import EncoderWorker

log = logging.getLogger("recommender.runtime")
STOP_S = 5.0  # longest stop() waits for the loops to finish (each close after it is bounded too)


class Runtime:
    def __init__(self, settings: Settings, with_workers: bool | None = None, encoder=None):
        """`with_workers` (default: in embedded mode) runs the encoder worker and profile updater."""
        self.settings = settings
        faiss.omp_set_num_threads(1)  # one query at a time is tiny; OpenMP start-up costs more
        # BLAS on one thread too (numpy's and FAISS's): the kept neighbour lists' products are small,
        # and a second BLAS thread competes with the encoder (two replicas on two cores merging beside
        # a backfill: sustained ingest 192 items/s with two BLAS threads, 255 with one).
        threadpool_limits(limits=1, user_api="blas")
        self.event_log = open_event_log(settings)
        ensure_topics(self.event_log, settings)
        # Requests never wait for Redis longer than request_timeout_s (an outage answers 503).
        self.store = Store(open_redis(settings.redis_url, timeout_s=settings.request_timeout_s, retries=0))
        wait_for_redis(self.store)
        self.metrics = Metrics()
        self.with_workers = settings.embedded_log if with_workers is None else with_workers
        self.encoder = encoder
        if self.encoder is None and self.with_workers:  # the service alone never encodes
            self.encoder = load_encoder(settings.resolved_encoder, threads=settings.kernel_threads,
                                   kernel_path=settings.kernel_path or None)
        self.index = ItemIndex(kept_neighbours=settings.kept_neighbours)
        # POST /events: the live lane, sent at once, acknowledged within request_timeout_s or refused.
        self.producer = EventProducer(self.event_log, settings, lane="live",
                                      delivery_timeout_s=settings.request_timeout_s, linger_ms=0)
        self.monitor = LaneMonitor(self.event_log, settings, self.metrics)
        self.recommender = Recommender(self.store, self.index, self.producer, settings, self.metrics, self.monitor)
        self.index_updater = IndexUpdater(self.event_log, self.store, self.index, settings, self.metrics)
        self.worker = EncoderWorker(self.event_log, self.store, self.encoder, settings) if self.with_workers else None
        self.profiles = ProfileUpdater(self.event_log, self.store, settings) if self.with_workers else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.index_updater.bootstrap()
        self.monitor.check()
        loops = [("index-updater", self.index_updater.run), ("lane-monitor", self.monitor.run)]
        if self.worker:
            loops += [("encoder-worker", self.worker.run), ("profile-updater", self.profiles.run)]
        for name, loop in loops:
            thread = threading.Thread(target=loop, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + STOP_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for part in (self.worker, self.profiles, self.index_updater, self.recommender):
            if part is not None:
                part.close()
        try:
            self.producer.close()
        except Exception as exc:  # events the broker did not take were answered 503 already
            log.warning("closing the event producer: %s", exc)
        self.event_log.close()
