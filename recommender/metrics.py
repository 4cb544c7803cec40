"""Latency, freshness and throughput: Prometheus metrics plus a bounded recent window.

Prometheus (`/metrics`) gets histograms; the UI's live page needs percentiles over time, so the same
observations also go into fixed-size windows (deques with maxlen: memory stays bounded). Freshness
and backlog are kept per lane of item events (live, bulk).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ingest.schema import ItemChange
from ingest.settings import LANES

WINDOW = 5000  # observations kept per series for the live percentiles
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class StageTimer:
    """Per-stage wall time of one request, in milliseconds, plus the total."""

    def __init__(self):
        self._start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - began) * 1000

    def finish(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.stages.items()}
        out["total"] = round((time.perf_counter() - self._start) * 1000, 3)
        return out


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float]:
    if len(values) == 0:
        return {}
    arr = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, arr, strict=True)}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.query_seconds = Histogram("ternrec_query_latency_seconds", "query latency by stage",
                                       ["endpoint", "stage"], buckets=_BUCKETS, registry=self.registry)
        self.freshness_seconds = Histogram("ternrec_freshness_seconds",
                                           "item event produced -> searchable in the index, by lane",
                                           ["lane"], buckets=_BUCKETS, registry=self.registry)
        self.index_updates = Counter("ternrec_index_updates_total", "item changes applied to the index",
                                     registry=self.registry)
        self.events_submitted = Counter("ternrec_events_submitted_total", "events accepted by POST /events",
                                        ["type"], registry=self.registry)
        self.events_rejected = Counter("ternrec_events_rejected_total", "events rejected by POST /events",
                                       registry=self.registry)
        self.events_unavailable = Counter("ternrec_events_unavailable_total",
                                          "events POST /events could not hand to the broker (503)",
                                          registry=self.registry)
        self.index_size = Gauge("ternrec_index_size", "distinct searchable items", registry=self.registry)
        self.consumer_lag = Gauge("ternrec_consumer_lag", "records not yet consumed, by topic",
                                  ["topic"], registry=self.registry)
        self.lane_backlog = Gauge("ternrec_lane_backlog", "item events the encoder workers have not "
                                  "committed yet, by lane", ["lane"], registry=self.registry)
        self._lags: dict[str, int] = {}
        self._backlog: dict[str, int] = {}
        self._lag_checked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._queries: dict[str, deque] = {}
        # A window per lane: a backfill's many updates never push the live lane's out.
        self._freshness: dict[str, deque] = {lane: deque(maxlen=WINDOW) for lane in LANES}
        self._updates: deque = deque(maxlen=WINDOW)

    def observe_query(self, endpoint: str, latency_ms: dict[str, float]) -> None:
        now = time.time()
        for stage, ms in latency_ms.items():
            self.query_seconds.labels(endpoint, stage).observe(ms / 1000)
        with self._lock:
            self._queries.setdefault(endpoint, deque(maxlen=WINDOW)).append((now, latency_ms))

    def observe_index_update(self, applied: list[ItemChange]) -> None:
        """Changes now searchable: freshness is the time since each event was produced (its `ts`)."""
        if not applied:
            return
        now = time.time()
        freshness = [(max(0.0, now - c.ts), c.lane) for c in applied]
        for f, lane in freshness:
            self.freshness_seconds.labels(lane).observe(f)
        self.index_updates.inc(len(freshness))
        with self._lock:
            for f, lane in freshness:
                self._freshness[lane].append((now, f * 1000))  # lanes are LANES (change_from_json checks)
            self._updates.append((now, len(freshness)))

    def report_backlog(self, lags: dict[str, int]) -> None:
        """Each lane's backlog at the encoder workers (recommender.core.LaneMonitor)."""
        for lane, lag in lags.items():
            self.lane_backlog.labels(lane).set(lag)
        with self._lock:
            self._backlog.update(lags)

    def report_lag(self, topic: str, consumer, every_s: float = 1.0) -> None:
        """Records a consumer's lag, at most once per `every_s` (it can cost a broker call)."""
        now = time.monotonic()
        if now - self._lag_checked.get(topic, 0.0) < every_s:
            return
        self._lag_checked[topic] = now
        lag = consumer.lag()
        self.consumer_lag.labels(topic).set(lag)
        with self._lock:
            self._lags[topic] = lag

    def snapshot(self, window_s: float = 60.0) -> dict:
        """Percentiles over the last `window_s` seconds, for the UI and the benchmarks."""
        since = time.time() - window_s
        with self._lock:
            recent = [(ms, lane) for lane, window in self._freshness.items() for t, ms in window if t >= since]
            updates = sum(n for t, n in self._updates if t >= since)
            queries = {ep: [lat for t, lat in q if t >= since] for ep, q in self._queries.items()}
        stages = {}
        for endpoint, rows in queries.items():
            names = sorted({s for row in rows for s in row})
            stages[endpoint] = {s: percentiles([row[s] for row in rows if s in row]) for s in names}
            stages[endpoint]["count"] = len(rows)
        with self._lock:
            lags, backlog = dict(self._lags), dict(self._backlog)
        lanes = {}
        for lane in LANES:
            fresh = [ms for ms, of in recent if of == lane]
            lanes[lane] = {"backlog": backlog.get(lane), "freshness_ms": percentiles(fresh),
                           "freshness_count": len(fresh)}
        return {"window_s": window_s, "consumer_lag": lags, "freshness_ms": percentiles([ms for ms, _ in recent]),
                "freshness_count": len(recent), "lanes": lanes, "index_updates_per_s": round(updates / window_s, 2),
                "query_latency_ms": stages}

    def freshness_series(self, bucket_s: float = 5.0, window_s: float = 300.0) -> list[dict]:
        """Freshness p50/p99 per time bucket and lane, for the live chart."""
        since = time.time() - window_s
        with self._lock:
            rows = [(t, ms, lane) for lane, window in self._freshness.items() for t, ms in window if t >= since]
        buckets: dict[tuple[int, str], list[float]] = {}
        for t, ms, lane in rows:
            buckets.setdefault((int(t // bucket_s), lane), []).append(ms)
        return [{"t": b * bucket_s, "lane": lane, "count": len(v), **percentiles(v, (50, 99))}
                for (b, lane), v in sorted(buckets.items())]

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)
