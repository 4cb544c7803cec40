"""Query load (wrk) and the per-request cost of each part of the query path, for bench.pipeline."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter

from recommender.index import TIE_SLACK, ItemIndex, _Search
from recommender.service import Results
from recommender.store import Store, open_redis


def query_path_costs(redis_url: str, catalog_ids: list[str], calls: int = 2000) -> dict:
    """Per request, in microseconds (median of `calls`): what each change of the query path buys."""
    store = Store(open_redis(redis_url))
    index = ItemIndex()
    index.apply(list(store.iter_item_changes()))  # with metadata, as a replica bootstraps
    index.sync_neighbours()  # as an idle replica's lists are
    rng = np.random.default_rng(0)
    samples = [list(rng.choice(catalog_ids, 10, replace=False)) for _ in range(calls)]

    def median_us(fn, over: list[list[str]] = samples, per: int = 1) -> float:
        """Median over the id samples of fn(ids), divided by `per` (per id when `per` = 10)."""
        times = []
        for ids in over:
            began = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - began)
        return round(statistics.median(times) * 1e6 / per, 1)

    # Indexed books only: a smoke run (--limit) backfills part of the catalog.
    vectors = {i: v for i in catalog_ids[:2000] if (v := index.vector(i)) is not None}

    def searches(ids, shared: bool) -> None:
        if shared:  # what concurrent requests get: one scan for all of them
            index._scan([_Search(vectors[i], 10 + 1 + TIE_SLACK) for i in ids])
        else:
            for i in ids:
                index.search(vectors[i], 10, exclude={i})

    search_samples = [list(rng.choice(list(vectors), 10, replace=False)) for _ in range(200)]
    search_us = {shared: median_us(lambda ids, shared=shared: searches(ids, shared), search_samples, per=10)
                 for shared in (False, True)}
    kept_us = median_us(lambda ids: [index.neighbours(i, 10) for i in ids], search_samples, per=10)
    answers = [{"items": [{"item_id": i, "score": 0.5, **m} for i, m in index.metadata(ids).items()],
                "latency_ms": {"lookup": 0.01, "search": 0.3, "hydrate": 0.01, "total": 0.4}} for ids in samples]
    adapter = TypeAdapter(Results)
    it = iter(answers * 2)
    model_path = median_us(lambda _: json.dumps(adapter.dump_python(adapter.validate_python(next(it)), mode="json")))
    it = iter(answers * 2)
    direct = median_us(lambda _: json.dumps(next(it), allow_nan=False, separators=(",", ":")))
    return {"search_alone_us": search_us[False], "search_in_a_shared_scan_of_10_us": search_us[True],
            "similar_from_kept_lists_us": kept_us,
            "hydrate_10_from_redis_us": median_us(store.items_metadata),
            "hydrate_10_from_index_us": median_us(index.metadata),
            "response_model_validate_and_serialize_us": model_path, "direct_json_us": direct}


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


