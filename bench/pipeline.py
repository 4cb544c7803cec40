"""Pipeline benchmark on a real Kafka broker and a real redis-server: `python -m bench.pipeline`.

Measures, with the worker and the recommender as separate processes (as in `make stack`):
- the encoder's own throughput (in-process, micro-batches of `max_batch`), then sustained ingest:
  items produced as fast as possible → all searchable, items/s, and the ratio of the two;
- freshness (event produced → searchable in the index, which is what `/items/{id}/similar` reads)
  at 50 and 200 events/s: the service's own per-item measurement, plus an external check that
  polls `/items/{id}/similar` for a sample of the items;
- query latency p50/p99 of both endpoints at 1, 10 and 50 concurrent clients (wrk, keep-alive);
- resident memory (RSS and peak) of the worker and the recommender.
Results: reports/pipeline.json and the "Pipeline" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

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

COMMAND = "python -m bench.pipeline"


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


class Service:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def index_size(self) -> int:
        try:
            return self.http.get("/health").json()["index_size"]
        except (httpx.HTTPError, KeyError, ValueError):
            return -1

    def visible(self, item_id: str) -> bool:
        return self.http.get(f"/items/{item_id}/similar", params={"k": 1}).status_code == 200


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


def freshness_phase(producer: EventProducer, service: Service, rate: float, seconds: float,
                    encoder_ips: float) -> dict:
    """Produces new items at `rate`/s; the service measures each one, we poll a sample."""
    items = new_items(f"fresh{int(rate)}", int(rate * seconds))
    sample_every = max(1, len(items) // 60)
    external: list[float] = []
    lock = threading.Lock()

    def poll(item_id: str, produced: float) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if service.visible(item_id):
                with lock:
                    external.append((time.time() - produced) * 1000)
                return
            time.sleep(0.002)

    pollers = []
    phase_start = time.time()
    began = time.perf_counter()
    for n, template in enumerate(items):
        ahead = n / rate - (time.perf_counter() - began)
        if ahead > 0:
            time.sleep(ahead)
        event = template.model_copy(update={"ts": time.time()})  # produced now
        producer.send(event)
        producer.flush()
        if n % sample_every == 0:
            t = threading.Thread(target=poll, args=(event.item_id, event.ts), daemon=True)
            t.start()
            pollers.append(t)
    produced_s = time.perf_counter() - began
    for t in pollers:
        t.join()
    # A rate above what the encoder sustains leaves a backlog: wait for it to drain.
    wait_for(lambda: all(service.visible(i.item_id) for i in items[-5:]),
             60 + 3 * len(items) / encoder_ips, "last items visible")
    time.sleep(1.0)
    # Only what was applied during this phase (not the tail of an earlier one).
    stats = service.http.get("/stats", params={"window_s": time.time() - phase_start}).json()
    return {"rate_events_per_s": rate, "events": len(items), "seconds": round(produced_s, 1),
            "service_freshness_ms": stats["freshness_ms"], "service_count": stats["freshness_count"],
            "external_sample_ms": {f"p{q}": round(float(np.percentile(external, q)), 1) for q in (50, 95, 99)}
            if external else {}, "external_samples": len(external)}


def parse_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, paths: list[str], connections: int, seconds: int, scripts: Path) -> dict:
    script = scripts / f"paths-{abs(hash(tuple(paths)))}.lua"
    table = ",".join(f'"{p}"' for p in paths)
    script.write_text(f"local paths = {{{table}}}\nlocal n = 0\n"
                      "request = function()\n  n = n + 1\n"
                      "  return wrk.format('GET', paths[(n % #paths) + 1])\nend\n")
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if len(dist) < 4:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"connections": connections, "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
            "p50_ms": parse_ms(dist["50"]), "p90_ms": parse_ms(dist["90"]), "p99_ms": parse_ms(dist["99"]),
            "non_2xx": int(errors[1]) if errors else 0}


def spawn(argv: list[str], env: dict, log: Path):
    with open(log, "wb") as out:
        return spawn_child(argv, cwd=REPO_ROOT, env=env, stdout=out)


def markdown(r: dict) -> str:
    lines = [f"Command: `{COMMAND}` (real Kafka + real Redis on 127.0.0.1; worker and recommender as "
             f"separate processes, {r['http_workers']} recommender replica(s); encoder `{r['encoder']}`; "
             f"{r['catalog_items']} catalog items; 1-minute load average {r['load_average']['start']} at the "
             f"start, {r['load_average']['end']} at the end, on 2 cores shared with other jobs).", "",
             "| ingest | items/s |", "|---|---|",
             f"| encoder alone, batches of {r['max_batch']} | {r['encoder_items_per_s']:.0f} |",
             f"| sustained ingest, produced → searchable | {r['ingest']['items_per_s']:.0f} "
             f"({r['ingest']['ratio_to_encoder']:.0%} of the encoder) |", "",
             "| freshness, produced → searchable | events | service p50 / p95 / p99 ms | "
             "external sample p50 / p95 / p99 ms |", "|---|---|---|---|"]
    for f in r["freshness"]:
        s, e = f["service_freshness_ms"], f["external_sample_ms"]
        lines.append(f"| {f['rate_events_per_s']:.0f} events/s | {f['events']} | "
                     f"{s.get('p50', '-')} / {s.get('p95', '-')} / {s.get('p99', '-')} | "
                     f"{e.get('p50', '-')} / {e.get('p95', '-')} / {e.get('p99', '-')} |")
    lines += ["", "| query | clients | requests/s | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for endpoint, runs in r["queries"].items():
        for q in runs:
            lines.append(f"| {endpoint} | {q['connections']} | {q['requests_per_s']:.0f} | {q['p50_ms']:.2f} | "
                         f"{q['p90_ms']:.2f} | {q['p99_ms']:.2f} |")
    lines += ["", "| process | RSS MiB | peak RSS MiB |", "|---|---|---|"]
    for name, m in r["memory"].items():
        lines.append(f"| {name} | {m['rss_mib']} | {m['peak_rss_mib']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="", help="encoder spec (default: the product's default)")
    parser.add_argument("--users", type=int, default=2000, help="users whose interactions are replayed")
    parser.add_argument("--rates", default="50,200", help="freshness phases, events/s")
    parser.add_argument("--phase-seconds", type=float, default=20)
    parser.add_argument("--ingest-items", type=int, default=3000)
    parser.add_argument("--query-seconds", type=int, default=10)
    parser.add_argument("--http-workers", type=int, default=2, help="recommender replicas (processes)")
    args = parser.parse_args(argv)
    settings = Settings(encoder=args.encoder)
    spec = settings.resolved_encoder
    load_at_start = os.getloadavg()[0]
    texts = [item.text for item in load_items()[:2000]]
    encoder = load_encoder(spec)
    encoder_name = encoder.name
    print(f"encoder {encoder_name}: measuring its own throughput ...", flush=True)
    encoder_ips = encoder_throughput(encoder, texts, settings.max_batch)
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
        worker = spawn([sys.executable, "-m", "recommender.worker"], env, workdir / "worker.log")
        recommender = spawn([sys.executable, "-m", "recommender.service"], env, workdir / "recommender.log")
        service = Service(f"http://127.0.0.1:{port}")
        try:
            wait_for(lambda: service.index_size() >= 0, 120, "recommender up", every=0.5)
            print("loading the catalog ...", flush=True)
            events = selected_events(Selection(users=args.users, interleave=True))
            replay(event_log, settings, events, progress=True)
            catalog_items = sum(1 for e in events if e.type == "item_upsert")
            wait_for(lambda: service.index_size() >= catalog_items, 1800, "catalog indexed", every=0.5)

            print("sustained ingest ...", flush=True)
            producer = EventProducer(event_log, settings)
            burst = new_items("ingest", args.ingest_items)
            began = time.perf_counter()
            for event in burst:
                producer.send(event.model_copy(update={"ts": time.time()}))
            producer.flush()
            wait_for(lambda: service.index_size() >= catalog_items + len(burst), 1800, "burst indexed", every=0.1)
            ingest_ips = len(burst) / (time.perf_counter() - began)
            print(f"  {ingest_ips:.0f} items/s", flush=True)

            freshness = []
            for rate in (float(r) for r in args.rates.split(",")):
                print(f"freshness at {rate:.0f} events/s ...", flush=True)
                freshness.append(freshness_phase(producer, service, rate, args.phase_seconds, encoder_ips))
                print(f"  {freshness[-1]['service_freshness_ms']}", flush=True)

            users = sorted({e.user_id for e in events if e.type == "interaction"})[:500]
            item_paths = [f"/items/{i.item_id}/similar?k=10" for i in load_items()[:2000]]
            user_paths = [f"/users/{u}/recommendations?k=10" for u in users]
            queries = {}
            for endpoint, paths in (("similar", item_paths), ("recommendations", user_paths)):
                queries[endpoint] = []
                for clients in (1, 10, 50):
                    print(f"queries: {endpoint} x {clients} clients ...", flush=True)
                    queries[endpoint].append(wrk(service.url, paths, clients, args.query_seconds, workdir))
            memory = {"encoder worker": rss_mib(worker.pid), "recommender": rss_mib(recommender.pid)}
        finally:
            for proc in (worker, recommender):
                stop_child(proc, timeout=30)
            event_log.close()
    shutil.rmtree(workdir, ignore_errors=True)
    result = {"command": COMMAND, "encoder": encoder_name, "http_workers": args.http_workers,
              "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms, "catalog_items": catalog_items,
              "encoder_items_per_s": round(encoder_ips, 1),
              "ingest": {"items": len(burst), "items_per_s": round(ingest_ips, 1),
                         "ratio_to_encoder": round(ingest_ips / encoder_ips, 3)},
              "freshness": freshness, "queries": queries, "memory": memory,
              "load_average": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)}}
    write_json("pipeline", result)
    update_section("Pipeline", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
