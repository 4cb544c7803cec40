"""Start-up time of the local services: `python -m bench.services` -> reports/services.json.

- Kafka cold start: a fresh temporary data dir each time, so it includes formatting the KRaft
  storage (a separate short JVM run) and the broker's start until a metadata request lists it.
- Kafka warm restart: stop + start in the same data dir (no format).
- Redis cold start: a fresh data dir, until PING answers (from our own process).
- Redis warm restart: `restart()` (SIGTERM, same port and data dir) with --redis-keys keys in
  the append-only file, until PING answers after the AOF is replayed.

Median of --runs (default 3) of each; the machine is shared, so the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from bench.report import update_section
from ingest.services import LocalKafka, LocalRedis, fetch_kafka_jars
from ingest.settings import KAFKA_VERSION, REPO_ROOT, Settings


def _summary(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "max_s": round(max(samples), 3), "samples_s": [round(x, 3) for x in samples]}


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def bench_kafka(runs: int) -> dict:
    cold, fmt, ready, stop = [], [], [], []
    for _ in range(runs):
        broker = LocalKafka()
        broker.start()
        cold.append(broker.startup_seconds)
        fmt.append(broker.timings["prepare_s"])
        ready.append(broker.timings["launch_to_ready_s"])
        broker.stop()
        stop.append(broker.stop_seconds)
    warm = []
    broker = LocalKafka()
    broker.start()
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            broker.restart()
            warm.append(time.perf_counter() - t0)
    finally:
        broker.stop()
    return {
        "cold_start": _summary(cold),
        "cold_start_format_storage": _summary(fmt),
        "cold_start_broker_launch_to_ready": _summary(ready),
        "graceful_stop": _summary(stop),
        "warm_restart_stop_plus_start": _summary(warm),
    }


def bench_redis(runs: int, keys: int) -> dict:
    cold, stop = [], []
    for _ in range(runs):
        server = LocalRedis(password="bench")
        server.start()
        cold.append(server.startup_seconds)
        server.stop()
        stop.append(server.stop_seconds)
    warm_total, warm_start = [], []
    server = LocalRedis(password="bench")
    server.start()
    try:
        with server.client() as r:
            pipe = r.pipeline(transaction=False)
            for i in range(keys):
                pipe.hset(f"item:{i}", mapping={"title": f"title {i}", "v": "x" * 64})
                if i % 5000 == 4999:
                    pipe.execute()
            pipe.execute()
        for _ in range(runs):
            t0 = time.perf_counter()
            server.restart()
            warm_total.append(time.perf_counter() - t0)
            warm_start.append(server.startup_seconds)
            with server.client() as r:
                assert r.dbsize() == keys, "restart lost data"
    finally:
        server.stop()
    return {
        "cold_start": _summary(cold),
        "graceful_stop": _summary(stop),
        "warm_restart_keys": keys,
        "warm_restart_stop_plus_start": _summary(warm_total),
        "warm_restart_start_until_ping": _summary(warm_start),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.services", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis-keys", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "services.json")
    args = parser.parse_args(argv)

    fetch_kafka_jars(Settings())
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    redis_report = bench_redis(args.runs, args.redis_keys)
    kafka_report = bench_kafka(args.runs)
    report = {
        "what": "start-up time of LocalKafka / LocalRedis (ingest/services/), seconds",
        "runs": args.runs,
        "kafka": {"version": KAFKA_VERSION, "mode": "KRaft single node, -Xmx512m", **kafka_report},
        "redis": {"version": _version(["redis-server", "--version"]), "persistence": "AOF everysec",
                  **redis_report},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "java": _version(["java", "-version"]),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other jobs; load average in 1/5/15 min"},
        "bench_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    k, r = report["kafka"], report["redis"]
    update_section("Services", "\n".join([
        f"Command: `python -m bench.services` — median of {args.runs} starts, fresh temp data dirs, "
        f"127.0.0.1 (load average {report['machine']['loadavg_start'][0]} at the start: a shared machine).", "",
        "| service | what | median s | min s | max s |", "|---|---|---|---|---|",
        *[f"| Kafka {KAFKA_VERSION} (KRaft) | {label} | {k[key]['median_s']} | {k[key]['min_s']} | {k[key]['max_s']} |"
          for key, label in (("cold_start", "cold start: format + broker until a metadata request lists it"),
                             ("cold_start_format_storage", "of which formatting the storage"),
                             ("cold_start_broker_launch_to_ready", "of which broker launch until ready"),
                             ("graceful_stop", "graceful stop"),
                             ("warm_restart_stop_plus_start", "warm restart, same data dir"))],
        *[f"| Redis | {label} | {r[key]['median_s']} | {r[key]['min_s']} | {r[key]['max_s']} |"
          for key, label in (("cold_start", "cold start until PING"), ("graceful_stop", "graceful stop"),
                             ("warm_restart_stop_plus_start",
                              f"warm restart with {r['warm_restart_keys']:,} keys in the AOF"))]]))
    print(f"kafka cold start  median {k['cold_start']['median_s']:.2f}s "
          f"(format {k['cold_start_format_storage']['median_s']:.2f}s + broker "
          f"{k['cold_start_broker_launch_to_ready']['median_s']:.2f}s), warm restart "
          f"{k['warm_restart_stop_plus_start']['median_s']:.2f}s, stop {k['graceful_stop']['median_s']:.2f}s")
    print(f"redis cold start  median {r['cold_start']['median_s']:.3f}s, warm restart with "
          f"{r['warm_restart_keys']} keys {r['warm_restart_stop_plus_start']['median_s']:.3f}s "
          f"(start until PING {r['warm_restart_start_until_ping']['median_s']:.3f}s)")
    print(f"load average {report['machine']['loadavg_start']} -> {report['machine']['loadavg_end']}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
