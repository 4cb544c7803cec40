"""Pipeline benchmark on a real Kafka broker and a real redis-server: `python -m bench.pipeline`.

Measures, with the worker and the recommender as separate processes (as in `make stack`):
- the encoder's own throughput (in-process, batches of `max_batch`), then, in the same run,
  sustained ingest: new items produced on the bulk lane as fast as possible → all searchable,
  items/s and the ratio of the two;
- freshness of live items (event produced → searchable in the index, which is what
  `/items/{id}/similar` reads) posted through `POST /events` at 20/s while the full catalog
  backfill (10,000 books and the interactions of --users users) streams in on the bulk lane: the
  service's own per-item measurement of the live lane, plus an external check that polls
  `/items/{id}/similar` for a sample of the items;
- freshness of live items at 50% of the encoder's measured capacity (rate set from this run), no
  backfill;
- query latency of both endpoints at 1, 10 and 50 concurrent clients (wrk, keep-alive), and what
  each change of the query path buys per request, timed in-process against the same Redis:
  a scan per query vs concurrent queries sharing a scan, a scan vs the item's kept neighbour list
  (recommender/neighbours.py) for similar items, hydration from Redis vs from the index's
  metadata, and the response model's validation and serialization vs writing the JSON directly;
- where the worker's time goes (seconds per stage, from its log) and resident memory.
Results: reports/pipeline.json and the "Pipeline" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.queries import query_path_costs, wrk
from bench.report import update_section, write_json
from encoder import Encoder, load_encoder
from ingest.catalog import load_items
from ingest.eventlog import EventProducer
from ingest.kafka_log import KafkaLog
from ingest.replay import Selection, replay, selected_events
from ingest.schema import ItemUpsert
from ingest.services import LocalKafka, LocalRedis, free_port
from ingest.services.process import process_tree, spawn_child, stop_child
from ingest.settings import REPO_ROOT, Settings
from recommender.store import Store, open_redis

COMMAND = "python -m bench.pipeline"
LIVE_RATE = 20.0  # live items/s during the backfill (the "new books one at a time")
POLL_MAX_S = 0.016  # the external check's longest interval between two polls of one sample


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process and its children (uvicorn replicas), now and at peak."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in process_tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1])
        except OSError:
            continue
    return {"rss_mib": round(total["VmRSS"] / 1024, 1), "peak_rss_mib": round(total["VmHWM"] / 1024, 1),
            "processes": len(process_tree(pid))}


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def pcts(values: list[float], qs=(50, 95, 99)) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 1) for q in qs} if values else {}


def lists_caught_up(url: str, answers: int = 10, timeout_s: float = 900.0) -> float:
    """Seconds until `answers` /health answers in a row, each on a new connection (so from either
    replica), say that the kept neighbour lists are up to date: the queries measure a steady state,
    not the catch-up after the 50% phase's backlog."""
    began = time.monotonic()
    in_a_row = 0
    while in_a_row < answers:
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"the replicas' neighbour lists were not up to date within {timeout_s:.0f} s")
        try:
            behind = httpx.get(f"{url}/health", timeout=10).json().get("neighbour_lists_behind", 0)
        except (httpx.HTTPError, ValueError):
            behind = -1
        in_a_row = in_a_row + 1 if behind == 0 else 0
        time.sleep(0.2)
    return time.monotonic() - began


class Service:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def health(self) -> dict:
        try:
            return self.http.get("/health").json()
        except (httpx.HTTPError, ValueError):
            return {}

    def index_size(self) -> int:
        return self.health().get("index_size", -1)

    def visible(self, item_id: str) -> bool:
        return self.http.get(f"/items/{item_id}/similar", params={"k": 1}).status_code == 200

    def stats(self, since: float) -> dict:
        return self.http.get("/stats", params={"window_s": time.time() - since}).json()


def encoder_throughput(encoder: Encoder, texts: list[str], batch: int) -> float:
    encoder.encode(texts[:batch], batch_size=batch)  # warm-up
    began = time.perf_counter()
    for start in range(0, len(texts), batch):
        encoder.encode(texts[start:start + batch], batch_size=batch)
    return len(texts) / (time.perf_counter() - began)


def new_items(tag: str, n: int) -> list[ItemUpsert]:
    """Fresh item ids with real catalog texts (so encode cost is realistic)."""
    catalog = load_items()
    return [ItemUpsert(type="item_upsert", item_id=f"{tag}-{k}", title=catalog[k % len(catalog)].title,
                       text=catalog[k % len(catalog)].text + f" (edition {k})") for k in range(n)]


class ExternalCheck:
    """Polls `/items/{id}/similar` for a sample of the live items until each answers."""

    def __init__(self, service: Service):
        self.service = service
        self.latencies: list[float] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def watch(self, item_id: str, produced: float) -> None:
        thread = threading.Thread(target=self._poll, args=(item_id, produced), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self, item_id: str, produced: float) -> None:
        # The interval grows from 2 ms to at most POLL_MAX_S (the sample's resolution): at a fixed
        # 2 ms, the samples still waiting once freshness degrades spin on the cores the worker needs
        # (seen: the bench process at 50-90% CPU in the 50%-capacity phase).
        http = httpx.Client(base_url=self.service.url, timeout=10)
        deadline, interval = time.monotonic() + 60, 0.002
        while time.monotonic() < deadline:
            if http.get(f"/items/{item_id}/similar", params={"k": 1}).status_code == 200:
                with self._lock:
                    self.latencies.append((time.time() - produced) * 1000)
                return
            time.sleep(interval)
            interval = min(2 * interval, POLL_MAX_S)

    def join(self) -> dict:
        for thread in self._threads:
            thread.join()
        return pcts(self.latencies)


def stream_live(send, items: list[ItemUpsert], rate: float, check: ExternalCheck, sample_every: int,
                until=None) -> int:
    """Sends items at `rate`/s (each stamped with its send time) until `until()` or the list ends."""
    began = time.perf_counter()
    for n, template in enumerate(items):
        if until is not None and until():
            return n
        ahead = n / rate - (time.perf_counter() - began)
        if ahead > 0:
            time.sleep(ahead)
        event = template.model_copy(update={"ts": time.time()})
        send(event)
        if n % sample_every == 0:
            check.watch(event.item_id, event.ts)
    return len(items)


def live_summary(service: Service, since: float, sent: int, check: ExternalCheck, seconds: float,
                 rate: float) -> dict:
    time.sleep(1.0)
    live = service.stats(since)["lanes"]["live"]
    return {"rate_events_per_s": rate, "events": sent, "seconds": round(seconds, 1),
            "service_freshness_ms": live["freshness_ms"], "service_count": live["freshness_count"],
            "external_sample_ms": check.join(), "external_samples": len(check.latencies)}


def backfill_phase(event_log: KafkaLog, settings: Settings, service: Service, events: list, catalog_ids: list[str],
                   ) -> tuple[dict, dict]:
    """The full catalog (and interactions) on the bulk lane while live items come through POST /events."""
    store = Store(open_redis(settings.redis_url))
    done = threading.Event()
    backfill: dict = {}

    def run_backfill():
        began = time.perf_counter()
        replay(event_log, settings, events, progress=False)
        backfill["produced_s"] = round(time.perf_counter() - began, 1)
        # Every catalog item written (the live items count in the index size too), then searchable.
        wait_for(lambda: len(store.stored_versions(catalog_ids)) == len(catalog_ids), 3600, "catalog written",
                 every=0.25)
        wait_for(lambda: all(service.visible(i) for i in catalog_ids[-5:]), 60, "catalog searchable")
        backfill["indexed_s"] = round(time.perf_counter() - began, 1)
        done.set()

    http = httpx.Client(base_url=service.url, timeout=10)

    def post(event: ItemUpsert) -> None:
        http.post("/events", content=event.to_json(), headers={"Content-Type": "application/json"}
                  ).raise_for_status()

    check, since = ExternalCheck(service), time.time()
    began = time.perf_counter()
    thread = threading.Thread(target=run_backfill)
    thread.start()
    sent = stream_live(post, new_items("live", int(LIVE_RATE * 900)), LIVE_RATE, check, sample_every=5,
                       until=done.is_set)
    thread.join()
    live = live_summary(service, since, sent, check, time.perf_counter() - began, LIVE_RATE)
    bulk = service.stats(since)["lanes"]["bulk"]
    return live, {"events": len(events), "items": len(catalog_ids), **backfill,
                  "items_per_s": round(len(catalog_ids) / backfill["indexed_s"], 1),
                  "bulk_freshness_ms": bulk["freshness_ms"]}


def capacity_phase(event_log: KafkaLog, settings: Settings, service: Service, rate: float, seconds: float) -> dict:
    producer = EventProducer(event_log, settings, lane="live", linger_ms=0)
    items = new_items(f"fresh{int(rate)}", int(rate * seconds))
    check, since = ExternalCheck(service), time.time()
    began = time.perf_counter()
    sent = stream_live(producer.send, items, rate, check, sample_every=max(1, len(items) // 60))
    producer.flush(timeout=60)
    produced_s = time.perf_counter() - began
    wait_for(lambda: all(service.visible(i.item_id) for i in items[-5:]), 600, "last items visible")
    return live_summary(service, since, sent, check, produced_s, rate)


def worker_stages(log: Path) -> dict:
    """The worker's own account of its time, from the line it logs when it stops."""
    found = re.findall(r"stopped after (\d+) batches \((\d+) live, (\d+) bulk\), (\d+) items encoded; (.*)",
                       log.read_text())
    if not found:
        return {}
    batches, live, bulk, encoded, stages = found[-1]
    return {"batches": int(batches), "live_batches": int(live), "bulk_batches": int(bulk), "encoded": int(encoded),
            "seconds": {name: float(s) for name, s in re.findall(r"(\w+) ([\d.]+) s", stages)}}


def spawn(argv: list[str], env: dict, log: Path):
    with open(log, "wb") as out:
        return spawn_child(argv, cwd=REPO_ROOT, env=env, stdout=out)


def _ms(d: dict, key: str) -> str:
    return "-" if key not in d else f"{d[key]:.1f}"


def markdown(r: dict) -> str:
    b = r["backfill"]
    lines = [f"Command: `{COMMAND}` (real Kafka + real Redis on 127.0.0.1; worker and recommender as "
             f"separate processes, {r['http_workers']} recommender replica(s); encoder `{r['encoder']}`; "
             f"max_batch {r['max_batch']}, bulk_slice_ms {r['bulk_slice_ms']}, "
             f"kept_neighbours {r.get('kept_neighbours', 0)}; {b['items']} catalog items; "
             f"`uptime` load average {r['load_average']['start']} at the start, {r['load_average']['end']} at "
             "the end, on 2 cores).", "",
             "| ingest | items/s |", "|---|---|",
             f"| encoder alone, batches of {r['max_batch']} | {r['encoder_items_per_s']:.0f} |",
             f"| sustained ingest (bulk lane), produced → searchable | {r['ingest']['items_per_s']:.0f} "
             f"({r['ingest']['ratio_to_encoder']:.0%} of the encoder) |",
             f"| full catalog backfill with live traffic beside it | {b['items_per_s']:.0f} "
             f"({b['items']} items in {b['indexed_s']} s) |", "",
             "| live freshness, produced → searchable | events | service p50 / p95 / p99 ms | "
             "external sample p50 / p95 / p99 ms |", "|---|---|---|---|"]
    for name, f in (("20/s via POST /events during the full backfill", r["freshness_during_backfill"]),
                    (f"{f_rate(r)}/s (50% of the encoder), no backfill", r["freshness_at_half_capacity"])):
        s, e = f["service_freshness_ms"], f["external_sample_ms"]
        lines.append(f"| {name} | {f['events']} | {_ms(s, 'p50')} / {_ms(s, 'p95')} / {_ms(s, 'p99')} | "
                     f"{_ms(e, 'p50')} / {_ms(e, 'p95')} / {_ms(e, 'p99')} |")
    lines += ["", "Queries once the replicas' kept neighbour lists were up to date "
              f"({r['lists_caught_up_s']} s after the 50% phase; until then similar items are scans):", "",
              "| query | clients | requests/s | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for endpoint, runs in r["queries"].items():
        for q in runs:
            lines.append(f"| {endpoint} | {q['connections']} | {q['requests_per_s']:.0f} | {q['p50_ms']:.2f} | "
                         f"{q['p90_ms']:.2f} | {q['p99_ms']:.2f} |")
    c = r["query_path_us"]
    lines += ["", "| query path, per request (in-process, median) | before | now |", "|---|---|---|",
              f"| search (flat, {b['items']}+ items) | {c['search_alone_us']:.0f} µs (a scan per query) | "
              f"{c['search_in_a_shared_scan_of_10_us']:.0f} µs (10 concurrent queries share a scan) |",
              f"| similar items: their 10 nearest | {c['search_alone_us']:.0f} µs (a scan) | "
              f"{c['similar_from_kept_lists_us']:.0f} µs (the item's kept list, no scan) |",
              f"| hydrate 10 results | {c['hydrate_10_from_redis_us']:.0f} µs (Redis round trip) | "
              f"{c['hydrate_10_from_index_us']:.0f} µs (index metadata) |",
              f"| write the JSON answer | {c['response_model_validate_and_serialize_us']:.0f} µs (response model) | "
              f"{c['direct_json_us']:.0f} µs (direct) |"]
    stages = r["worker"].get("seconds", {})
    if stages:
        lines += ["", "Worker time by stage over the run (s): "
                  + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
                  + f"; {r['worker']['live_batches']} live and {r['worker']['bulk_batches']} bulk batches."]
    lines += ["", "| process | RSS MiB | peak RSS MiB |", "|---|---|---|"]
    for name, m in r["memory"].items():
        lines.append(f"| {name} | {m['rss_mib']} | {m['peak_rss_mib']} |")
    return "\n".join(lines)


def f_rate(r: dict) -> str:
    return f"{r['freshness_at_half_capacity']['rate_events_per_s']:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="", help="encoder spec (default: the product's default)")
    parser.add_argument("--users", type=int, default=2000, help="users whose interactions the backfill replays")
    parser.add_argument("--limit", type=int, help="backfill only the first N books (smoke runs; default all)")
    parser.add_argument("--phase-seconds", type=float, default=20, help="the 50%-capacity phase")
    parser.add_argument("--ingest-items", type=int, default=3000)
    parser.add_argument("--query-seconds", type=int, default=10)
    parser.add_argument("--http-workers", type=int, default=2, help="recommender replicas (processes)")
    args = parser.parse_args(argv)
    settings = Settings(encoder=args.encoder)
    spec = settings.resolved_encoder
    load_at_start = os.getloadavg()[0]
    catalog = load_items()
    encoder = load_encoder(spec)
    encoder_name = encoder.name
    print(f"encoder {encoder_name}: measuring its own throughput ...", flush=True)
    encoder_ips = encoder_throughput(encoder, [item.text for item in catalog[:2000]], settings.max_batch)
    del encoder  # the worker process loads its own
    print(f"  {encoder_ips:.0f} items/s", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="ternrec-bench-"))
    with LocalKafka(settings) as kafka, LocalRedis(password=secrets.token_urlsafe(12)) as redis_server:
        port = free_port()
        env = {**os.environ, "TERNREC_KAFKA_BOOTSTRAP": kafka.bootstrap, "TERNREC_REDIS_URL": redis_server.url,
               "TERNREC_HTTP_PORT": str(port), "TERNREC_ENCODER": spec, "HF_HUB_OFFLINE": "1",
               "TERNREC_HTTP_WORKERS": str(args.http_workers)}
        settings = Settings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_server.url)
        event_log = KafkaLog(kafka.bootstrap)
        worker_log = workdir / "worker.log"
        worker = spawn([sys.executable, "-m", "recommender.worker"], env, worker_log)
        recommender = spawn([sys.executable, "-m", "recommender.service"], env, workdir / "recommender.log")
        service = Service(f"http://127.0.0.1:{port}")
        try:
            wait_for(lambda: service.health().get("status") == "ok", 180, "recommender up", every=0.5)
            events = selected_events(Selection(limit=args.limit, users=args.users, interleave=True))
            catalog_ids = [e.item_id for e in events if e.type == "item_upsert"]
            print(f"full backfill ({len(catalog_ids)} items) with live items at {LIVE_RATE:.0f}/s ...", flush=True)
            during_backfill, backfill = backfill_phase(event_log, settings, service, events, catalog_ids)
            print(f"  backfill {backfill}\n  live {during_backfill}", flush=True)

            print("sustained ingest ...", flush=True)
            producer = EventProducer(event_log, settings, lane="bulk")
            burst = new_items("ingest", args.ingest_items)
            before = service.index_size()
            began = time.perf_counter()
            for event in burst:
                producer.send(event.model_copy(update={"ts": time.time()}))
            producer.flush()
            wait_for(lambda: service.index_size() >= before + len(burst), 1800, "burst indexed", every=0.1)
            ingest_ips = len(burst) / (time.perf_counter() - began)
            print(f"  {ingest_ips:.0f} items/s", flush=True)

            rate = round(encoder_ips / 2)
            print(f"freshness at {rate} events/s (50% of the encoder) ...", flush=True)
            half = capacity_phase(event_log, settings, service, rate, args.phase_seconds)
            print(f"  {half}", flush=True)

            print("waiting for the replicas' kept neighbour lists ...", flush=True)
            lists_wait_s = lists_caught_up(service.url)
            print(f"  {lists_wait_s:.1f} s", flush=True)
            users = sorted({e.user_id for e in events if e.type == "interaction"})[:500]
            item_paths = [f"/items/{i.item_id}/similar?k=10" for i in catalog[:2000]]
            user_paths = [f"/users/{u}/recommendations?k=10" for u in users]
            queries = {}
            for endpoint, paths in (("similar", item_paths), ("recommendations", user_paths)):
                queries[endpoint] = []
                for clients in (1, 10, 50):
                    print(f"queries: {endpoint} x {clients} clients ...", flush=True)
                    queries[endpoint].append(wrk(service.url, paths, clients, args.query_seconds, workdir))
            print("query path costs ...", flush=True)
            costs = query_path_costs(redis_server.url, [i.item_id for i in catalog])
            memory = {"encoder worker": rss_mib(worker.pid), "recommender": rss_mib(recommender.pid)}
        finally:
            for proc in (worker, recommender):
                stop_child(proc, timeout=30)
            event_log.close()
        stages = worker_stages(worker_log)
    shutil.rmtree(workdir, ignore_errors=True)
    result = {"command": COMMAND, "encoder": encoder_name, "http_workers": args.http_workers,
              "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
              "bulk_slice_ms": settings.bulk_slice_ms, "kept_neighbours": settings.kept_neighbours,
              "encoder_items_per_s": round(encoder_ips, 1),
              "ingest": {"lane": "bulk", "items": len(burst), "items_per_s": round(ingest_ips, 1),
                         "ratio_to_encoder": round(ingest_ips / encoder_ips, 3)},
              "backfill": backfill, "freshness_during_backfill": during_backfill,
              "freshness_at_half_capacity": half, "lists_caught_up_s": round(lists_wait_s, 1),
              "queries": queries, "query_path_us": costs,
              "worker": stages, "memory": memory,
              "load_average": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)}}
    write_json("pipeline", result)
    update_section("Pipeline", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
