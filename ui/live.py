"""Live: throughput, freshness and query latency of the running service; refreshes by itself.

Freshness and backlog are shown per lane of item events: live (POST /events, new items) and bulk
(replay, backfills), which the encoder workers drain after the live lane.
"""

from __future__ import annotations

import time
from collections import deque

import pandas as pd
import streamlit as st

from ui.client import ServiceError
from ui.common import client, fmt_ms

REFRESH_S = 2.0
WINDOW_S = 60.0
HISTORY = 150  # samples kept per session (5 minutes at one every 2 s)
STAGE_ORDER = ("profile", "lookup", "coread", "search", "counts", "blend", "popular", "explain", "hydrate")
COUNTERS = {"index updates": "ternrec_index_updates_total", "API events": "ternrec_events_submitted_total"}


def _counter(metrics: dict[str, float], name: str) -> float | None:
    values = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def _rates(metrics: dict[str, float]) -> dict[str, float | None]:
    """Events/s since the previous refresh of this page, from the Prometheus counters."""
    now = time.time()
    history: deque = st.session_state.setdefault("live_history", deque(maxlen=HISTORY))
    counters = {label: _counter(metrics, name) for label, name in COUNTERS.items()}
    rates: dict[str, float | None] = dict.fromkeys(COUNTERS)
    if history:
        last_t, last = history[-1]
        dt = now - last_t
        for label, value in counters.items():
            if dt > 0 and value is not None and last.get(label) is not None:
                rates[label] = max(0.0, (value - last[label]) / dt)
    history.append((now, counters))
    st.session_state.setdefault("live_rates", deque(maxlen=HISTORY)).append({"t": now, **rates})
    return rates


def _latency_table(stages: dict) -> pd.DataFrame:
    rows = {stage: values for stage, values in stages.items() if isinstance(values, dict)}
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=["p50", "p95", "p99"])
    # The order the stages run in; unknown stages before the total.
    rank = {s: n for n, s in enumerate(STAGE_ORDER)}
    return frame.loc[sorted(frame.index, key=lambda s: (s == "total", rank.get(s, len(rank)), s))]


def _seconds_ago(frame: pd.DataFrame, now: float) -> pd.DataFrame:
    return frame.assign(**{"seconds ago": (frame["t"] - now).round(1)}).set_index("seconds ago")


def _lanes_table(lanes: dict) -> pd.DataFrame:
    """One row per lane: its backlog at the encoder workers and its freshness in the window."""
    rows = {lane: {"backlog": lane_stats.get("backlog"), "updates": lane_stats.get("freshness_count", 0),
                   "freshness p50": fmt_ms(lane_stats.get("freshness_ms", {}).get("p50")),
                   "freshness p99": fmt_ms(lane_stats.get("freshness_ms", {}).get("p99"))}
            for lane, lane_stats in lanes.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def _freshness_lines(series: pd.DataFrame) -> pd.DataFrame:
    """p50 and p99 per lane and bucket as columns ("live p50", "bulk p99", ...)."""
    wide = series.pivot_table(index="t", columns="lane", values=["p50", "p99"])
    wide.columns = [f"{lane} {q}" for q, lane in wide.columns]
    return wide.reset_index()


def _panel() -> None:
    try:
        stats = client().stats(WINDOW_S)
        metrics = client().metrics()
        health = client().health()
    except ServiceError as exc:
        st.error(exc.message)
        return
    rates = _rates(metrics)
    fresh = stats.get("freshness_ms", {})
    lags = stats.get("consumer_lag") or {}  # topic -> records not yet consumed, when measured
    lag = sum(lags.values()) if lags else None
    cols = st.columns(6)
    cols[0].metric("Searchable items", f"{health.get('index_size', stats.get('index_size', 0)):,}")
    cols[1].metric(f"Index updates/s ({WINDOW_S:.0f} s)", f"{stats.get('index_updates_per_s', 0):,.1f}")
    now_rate = rates["index updates"]
    cols[2].metric("Index updates/s (now)", "–" if now_rate is None else f"{now_rate:,.1f}")
    cols[3].metric("Freshness p50", fmt_ms(fresh.get("p50")), help="item event produced → searchable")
    cols[4].metric("Freshness p99", fmt_ms(fresh.get("p99")))
    cols[5].metric("Consumer lag", "n/a" if lag is None else f"{lag:,.0f}",
                   help="records not yet consumed: "
                   + (", ".join(f"{topic} {n:,}" for topic, n in lags.items()) if lags
                      else "not reported yet"))
    lanes = stats.get("lanes") or {}
    if lanes:
        st.markdown(f"**Lanes** (item events; the encoder workers drain the live lane first; last {WINDOW_S:.0f} s)")
        st.dataframe(_lanes_table(lanes), width="stretch")
    api_rate = rates["API events"]
    st.caption(f"Service {health.get('status', '?')} · {stats.get('freshness_count', 0):,} index updates in the "
               f"last {WINDOW_S:.0f} s · events via POST /events: "
               f"{'–' if api_rate is None else f'{api_rate:,.1f}'}/s · refreshes every {REFRESH_S:.0f} s")

    left, right = st.columns(2)
    with left:
        st.markdown("**Freshness over time** (ms, p50 and p99 per lane and 5-s bucket)")
        series = pd.DataFrame(stats.get("freshness_series") or [])
        if series.empty or "p50" not in series or "lane" not in series:
            st.caption("No item updates in the last 5 minutes.")
        else:
            lines = _freshness_lines(series)
            st.line_chart(_seconds_ago(lines, time.time()).drop(columns="t"), height=220,
                          x_label="seconds ago", y_label="ms")
    with right:
        st.markdown("**Events/s over time** (this page's samples)")
        samples = pd.DataFrame(list(st.session_state.get("live_rates", [])))
        if len(samples) < 2:
            st.caption("Collecting samples …")
        else:
            st.line_chart(_seconds_ago(samples, time.time())[list(COUNTERS)].astype(float).round(2), height=220,
                          x_label="seconds ago", y_label="events/s")

    st.markdown(f"**Query latency per stage** (ms, last {WINDOW_S:.0f} s, server side)")
    endpoints = stats.get("query_latency_ms") or {}
    if not endpoints:
        st.caption("No queries in the window yet.")
    for column, (endpoint, stages) in zip(st.columns(max(len(endpoints), 1)), sorted(endpoints.items()),
                                          strict=False):
        with column:
            st.markdown(f"`{endpoint}` — {stages.get('count', 0):,} queries")
            st.dataframe(_latency_table(stages).style.format("{:.3f}", na_rep="–"), width="stretch")


def render() -> None:
    st.fragment(_panel, run_every=REFRESH_S)()
