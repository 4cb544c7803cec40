"""Recommendation quality, offline and through the service: `python -m bench.recommendation`.

The split (the same as encoder.evaluate.recommend_loo's): goodbooks `to_read`, users with at least 5
catalog books, 5,000 test users drawn with seed 0, one book held out each (seed 0), the user's other
books excluded from the ranking. Validation: 2,000 other eligible users (seed 1), one held out each;
the blend's weights are chosen there, never on the test users. Training data: every interaction but
the held-out ones, in file order.

Rows: popularity; content (mean profile) with full-precision MiniLM and with the shipped ternary
model; item-item cosine co-occurrence over the full matrix (the issue's baseline); the streaming
co-read model alone; the hybrid (recommender/blend.py on the co-read model that Store built on a
real redis-server, content from the ternary model, as the service runs). Cold items: all
interactions of a random 10% of books hidden (seed 2); recall@10 of the test users whose held-out
book is one of them, hybrid against content-only. The service run (bench/recommendation_service.py)
replays the same training data into the embedded service and asks it over HTTP.
Results: reports/recommendation.json, "Recommendation quality" in BENCHMARKS.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import numpy as np

from ingest.catalog import load_interactions, load_items
from ingest.schema import Interaction
from recommender.blend import DEFAULT_PARAMS, BlendParams, blend, candidates
from recommender.store import COREAD_CAP, COREAD_KEEP, COREAD_WINDOW, Store

COMMAND = "python -m bench.recommendation"
K = 10
N_TEST, N_VALID = 5000, 2000
BATCH = 500  # interactions per Store.apply_interactions call (the profile updater's poll size)


@dataclass(frozen=True)
class Split:
    item_ids: list[str]
    histories: dict[str, list[str]]  # user -> catalog books in file order
    test: dict[str, str]  # user -> held-out book
    valid: dict[str, str]

    def training(self, hidden: frozenset[str] = frozenset(), skip_users: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(user, book) pairs in file order, held-out and hidden books left out."""
        held = {**self.test, **self.valid}
        skip = set(skip_users)
        return [(u, b) for u, books in self.histories.items() if u not in skip
                for b in books if b != held.get(u) and b not in hidden]

    def history(self, user: str, hidden: frozenset[str] = frozenset()) -> list[str]:
        held = self.test.get(user) or self.valid.get(user)
        return [b for b in self.histories[user] if b != held and b not in hidden]


def make_split(n_test: int = N_TEST, n_valid: int = N_VALID, seed: int = 0) -> Split:
    items = [i.item_id for i in load_items()]
    pos = {item: i for i, item in enumerate(items)}
    pairs = load_interactions()
    pairs = pairs[pairs.item_id.isin(pos)]
    histories = {u: list(g) for u, g in pairs.groupby("user_id", sort=False)["item_id"]}
    eligible = sorted(u for u, books in histories.items() if len(set(books)) >= 5)

    def draw(pool: list[str], n: int, rng) -> dict[str, str]:
        if n < len(pool):
            pool = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
        held = {}
        for u in pool:  # encoder.evaluate.recommend_loo: a random one of the books in catalog order
            books = sorted({pos[b] for b in histories[u]})
            held[u] = items[books[rng.integers(len(books))]]
        return held

    test = draw(eligible, n_test, np.random.default_rng(seed))
    rest = [u for u in eligible if u not in test]
    valid = draw(rest, n_valid, np.random.default_rng(seed + 1))
    return Split(items, histories, test, valid)


# ----------------------------------------------------------------------------- ranking baselines

def metrics(ranks: np.ndarray) -> dict:
    """HitRate@K and NDCG@K with their standard errors, from the 0-based rank of each held-out book."""
    hit = (ranks < K).astype(float)
    ndcg = np.where(ranks < K, 1.0 / np.log2(ranks + 2.0), 0.0)
    n = len(ranks)
    return {"hitrate@10": float(hit.mean()), "hitrate_se": float(hit.std(ddof=1) / np.sqrt(n)),
            "ndcg@10": float(ndcg.mean()), "ndcg_se": float(ndcg.std(ddof=1) / np.sqrt(n)), "users": n}


def score_ranks(split: Split, users: dict[str, str], scores_of, hidden: frozenset[str] = frozenset()) -> np.ndarray:
    """Rank of each held-out book under `scores_of(list of user histories) -> (n, items)`; a user's
    other books are not candidates; ties count in the book's favour (as recommend_loo does)."""
    pos = {item: i for i, item in enumerate(split.item_ids)}
    names = list(users)
    out = []
    for start in range(0, len(names), 512):
        chunk = names[start:start + 512]
        histories = [[pos[b] for b in split.history(u, hidden)] for u in chunk]
        scores = np.asarray(scores_of(histories), dtype=np.float64)
        for row, seen in enumerate(histories):
            scores[row, seen] = -np.inf
        target = scores[np.arange(len(chunk)), [pos[users[u]] for u in chunk]]
        out.append(np.sum(scores > target[:, None], axis=1))
    return np.concatenate(out)


def content_scores(emb: np.ndarray):
    def scores(histories):
        profiles = np.stack([emb[h].mean(axis=0) if h else np.zeros(emb.shape[1], np.float32) for h in histories])
        profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
        return profiles @ emb.T
    return scores


def cooccurrence_scores(split: Split, training: list[tuple[str, str]]):
    """Item-item cosine over the full co-occurrence matrix: sum over the user's books of C_ij / sqrt(n_i n_j)."""
    from scipy import sparse

    pos = {item: i for i, item in enumerate(split.item_ids)}
    users = {u: n for n, u in enumerate(dict.fromkeys(u for u, _ in training))}
    x = sparse.csr_matrix((np.ones(len(training), np.float32), ([users[u] for u, _ in training],
                                                                 [pos[b] for _, b in training])),
                          shape=(len(users), len(pos)))
    x.data[:] = 1.0  # distinct users
    co = (x.T @ x).tocsr()
    co.setdiag(0)
    n = np.asarray(x.sum(axis=0)).ravel()
    inv = sparse.diags(1.0 / np.sqrt(np.maximum(n, 1.0)))
    cosine = (inv @ co @ inv).tocsr()

    def scores(histories):
        rows = sparse.csr_matrix((np.ones(sum(map(len, histories)), np.float32),
                                  (np.repeat(np.arange(len(histories)), [len(h) for h in histories]),
                                   [b for h in histories for b in h])), shape=(len(histories), len(pos)))
        return (rows @ cosine).toarray()
    return scores, n


# ----------------------------------------------------------------------------- the streaming model and the blend

def build_store(store: Store, training: list[tuple[str, str]], embeddings: dict[str, np.ndarray]) -> float:
    """Applies the training interactions through Store (the profile updater's code); returns events/s."""
    began = time.perf_counter()
    for start in range(0, len(training), BATCH):
        batch = [Interaction(type="interaction", user_id=u, item_id=b, kind="to_read", ts=1.0)
                 for u, b in training[start:start + BATCH]]
        store.apply_interactions(batch, {b.item_id: embeddings[b.item_id] for b in batch
                                         if b.item_id in embeddings})
    return len(training) / (time.perf_counter() - began)


def user_candidates(store: Store, emb: np.ndarray, items: list[str], pos: dict[str, int], user: str,
                    params: BlendParams):
    """What Recommender.recommend gathers for a user, with an exact numpy search in place of FAISS."""
    profile = store.user_profile(user)
    recent = profile.recent[:params.recent_books]
    sims = None
    hits: list[tuple[str, float]] = []
    if profile.vector is not None and np.any(profile.vector):
        sims = emb @ (profile.vector / np.linalg.norm(profile.vector))
        masked = sims.copy()
        masked[[pos[b] for b in profile.seen]] = -np.inf
        top = np.argpartition(-masked, params.content_candidates)[:params.content_candidates]
        hits = sorted(((items[t], float(sims[t])) for t in top), key=lambda h: (-h[1], h[0]))
    coread, support = store.coread_scores(recent, profile.seen, params.coread_candidates,
                                          also_count=[j for j, _ in hits], k=params.coread_per_book)

    def content_of(ids):
        return {} if sims is None else {j: float(sims[pos[j]]) for j in ids}
    return candidates(coread, hits, content_of, params), support


def hybrid_ranks(store: Store, emb: np.ndarray, split: Split, users: dict[str, str],
                 grid: list[BlendParams]) -> dict[BlendParams, np.ndarray]:
    """0-based rank of each held-out book in the top K of `blend` (K when absent), per parameter set."""
    pos = {item: i for i, item in enumerate(split.item_ids)}
    out = {p: np.full(len(users), K) for p in grid}
    by_candidates: dict[tuple, list[BlendParams]] = {}
    for p in grid:  # candidates depend on these four only: gathered once per group
        by_candidates.setdefault((p.recent_books, p.coread_per_book, p.coread_candidates, p.content_candidates),
                                 []).append(p)
    for group in by_candidates.values():
        for n, (user, held) in enumerate(users.items()):
            found, support = user_candidates(store, emb, split.item_ids, pos, user, group[0])
            for p in group:
                picks = [pick.item_id for pick in blend(found, support, p, K)]
                if held in picks:
                    out[p][n] = picks.index(held)
    return out


def tune(store: Store, emb: np.ndarray, split: Split) -> tuple[BlendParams, list[dict]]:
    """The blend weights with the best validation HitRate@10 (ties: the smaller co-read weight)."""
    # (recent books, neighbours read per book): about the same 1,000 entries read per request
    grid = [replace(DEFAULT_PARAMS, coread_weight=w, support_half=s, recent_books=r, coread_per_book=k)
            for r, k in ((20, 50), (30, 30), (50, 20))
            for w in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0) for s in (0.0, 2.0, 5.0, 20.0)]
    ranks = hybrid_ranks(store, emb, split, split.valid, grid)
    table = [{"recent_books": p.recent_books, "coread_per_book": p.coread_per_book,
              "coread_weight": p.coread_weight, "support_half": p.support_half, **metrics(r)}
             for p, r in ranks.items()]
    best = max(ranks, key=lambda p: (metrics(ranks[p])["hitrate@10"], -p.coread_weight))
    return best, table


# ----------------------------------------------------------------------------- embeddings

def catalog_embeddings() -> dict[str, np.ndarray]:
    """Catalog embeddings of full-precision MiniLM and of the shipped ternary model, from the
    project's one embedding cache (encoder/embedding_cache.py: encoded on first use)."""
    from encoder.data import catalog_texts
    from encoder.embedding_cache import encode_cached, model_fingerprint
    from encoder.evaluate import full_precision
    from encoder.loading import load_encoder
    from ingest.settings import BUNDLED_TERNARY_MODEL

    fp, fp_key = full_precision()
    ternary = load_encoder(BUNDLED_TERNARY_MODEL)
    _, texts, _ = catalog_texts()
    return {"full precision": encode_cached(fp, texts, fp_key),
            "ternary": encode_cached(ternary, texts, f"ternary:{ternary.backend}:"
                                     + model_fingerprint(BUNDLED_TERNARY_MODEL))}


# ----------------------------------------------------------------------------- the run

def coread_memory(store: Store) -> dict:
    """What the co-read model holds in Redis: keys, entries, bytes (MEMORY USAGE of every list)."""
    keys = list(store.r.scan_iter(match=f"{store.p}coread:*", count=1000))
    pipe = store.r.pipeline(transaction=False)
    for key in keys:
        pipe.zcard(key)
        pipe.memory_usage(key, samples=0)
    replies = pipe.execute()
    entries, sizes = np.array(replies[0::2]), np.array(replies[1::2])
    return {"items": len(keys), "entries": int(entries.sum()), "max_entries": int(entries.max()),
            "bytes": int(sizes.sum()), "bytes_per_item": round(float(sizes.mean()), 1),
            "bytes_per_entry": round(float(sizes.sum() / entries.sum()), 1)}


def item_store(redis_url: str, prefix: str, items: list[str], emb: np.ndarray) -> Store:
    """A Store under its own prefix with every catalog item and its embedding (what the worker writes)."""
    from ingest.schema import ItemUpsert
    from recommender.store import open_redis

    store = Store(open_redis(redis_url), prefix=prefix)
    for start in range(0, len(items), 1000):
        store.apply_item_events([(ItemUpsert(type="item_upsert", item_id=i, title=i, ts=1.0), emb[n])
                                 for n, i in enumerate(items[start:start + 1000], start)])
    return store


def offline(split: Split, emb: dict[str, np.ndarray], redis_url: str) -> dict:
    """Every offline row, the tuned blend, the cold-item comparison, the updater and memory figures."""
    from bench.recommendation_service import updater_throughput
    from ingest.settings import Settings

    tern = emb["ternary"]
    pos = {item: i for i, item in enumerate(split.item_ids)}
    training = split.training()
    popularity = np.bincount([pos[b] for _, b in training], minlength=len(pos)).astype(float)
    rows = {"popularity": metrics(score_ranks(split, split.test, lambda h: np.tile(popularity, (len(h), 1)))),
            "content, full-precision MiniLM, mean profile": metrics(
                score_ranks(split, split.test, content_scores(emb["full precision"]))),
            "content, shipped ternary model, mean profile": metrics(
                score_ranks(split, split.test, content_scores(tern)))}
    cooccurrence, _ = cooccurrence_scores(split, training)
    rows["item-item cosine co-occurrence (full matrix)"] = metrics(score_ranks(split, split.test, cooccurrence))
    print(rows, flush=True)

    store = item_store(redis_url, "offline:", split.item_ids, tern)
    updater = updater_throughput(store, training, Settings(kafka_bootstrap="", redis_url=redis_url))
    print("profile updater:", updater, flush=True)
    memory = coread_memory(store)
    best, validation = tune(store, tern, split)
    print("chosen on validation:", best, flush=True)
    coread_only = replace(best, coread_weight=1.0, support_half=0.0, content_candidates=0)
    test = hybrid_ranks(store, tern, split, split.test, [best, coread_only])
    rows["streaming co-read model alone (Redis, windowed, pruned)"] = metrics(test[coread_only])
    rows["hybrid: co-read + ternary content (recommender/blend.py)"] = metrics(test[best])

    rng = np.random.default_rng(2)
    hidden = frozenset(split.item_ids[i] for i in rng.choice(len(pos), size=len(pos) // 10, replace=False))
    cold_users = {u: b for u, b in split.test.items() if b in hidden and split.history(u, hidden)}
    cold_store = item_store(redis_url, "cold:", split.item_ids, tern)
    build_store(cold_store, split.training(hidden), dict(zip(split.item_ids, tern, strict=True)))
    cold = {"hidden_books": len(hidden), "users": len(cold_users),
            "content, ternary": metrics(score_ranks(split, cold_users, content_scores(tern), hidden)),
            "content, full precision": metrics(score_ranks(split, cold_users, content_scores(emb["full precision"]),
                                                           hidden)),
            "hybrid": metrics(hybrid_ranks(cold_store, tern, split, cold_users, [best])[best]),
            "hybrid, all test users": metrics(hybrid_ranks(cold_store, tern, split, split.test, [best])[best])}
    print("cold:", cold, flush=True)
    return {"rows": rows, "chosen": asdict(best), "validation": validation, "cold": cold,
            "updater": updater, "coread_memory": memory, "store": {"window": COREAD_WINDOW, "keep": COREAD_KEEP,
                                                                   "cap": COREAD_CAP}}


def service(split: Split, redis_url: str, params: BlendParams) -> dict:
    """The same training data through the embedded service (real Redis by URL), asked over HTTP."""
    from bench.recommendation_service import service_hits
    from encoder import load_encoder
    from ingest.settings import Settings

    test_histories = {u: split.history(u) for u in split.test}
    bulk = split.training(skip_users=split.test)
    run = service_hits(load_items(), bulk, test_histories, split.test,
                       load_encoder(Settings().resolved_encoder), redis_url=redis_url, blend=params)
    ranks = np.array([run["ranks"][u] for u in split.test])
    return {**metrics(ranks), "posted_interactions": run["posted"], "bulk_interactions": len(bulk),
            "strategies": run["strategies"],
            "requests": len(ranks), **latencies(run)}


def embedded_latency(split: Split, users: int, params: BlendParams) -> dict:
    """1-client latency of the embedded service (fakeredis) holding the first `users` users, as
    `python -m recommender.demo --users N` does, asked for each of those users once."""
    from bench.recommendation_service import service_hits
    from encoder import load_encoder
    from ingest.settings import Settings

    names = list(split.histories)[:users]
    bulk = [(u, b) for u in names for b in split.histories[u]]
    run = service_hits(load_items(), bulk, {}, {u: "" for u in names},
                       load_encoder(Settings().resolved_encoder), blend=params)
    return {"users": users, "requests": len(names), "strategies": run["strategies"], **latencies(run)}


def latencies(run: dict) -> dict:
    """p50 / p99 of the client's round trips and of the server's own total, milliseconds."""
    return {side: {f"p{q}": round(float(np.percentile(run[side], q)), 2) for q in (50, 99)}
            for side in ("client_ms", "server_ms")}


def latency_line(what: str, m: dict) -> str:
    return (f"{what}: `GET /users/{{id}}/recommendations?k=10`, 1 client, {m['requests']} requests"
            f": p50 {m['client_ms']['p50']} ms, p99 **{m['client_ms']['p99']} ms** at the client "
            f"(server total p99 {m['server_ms']['p99']} ms).")


def fmt(m: dict) -> str:
    return f"{m['hitrate@10']:.4f} ± {m['hitrate_se']:.4f} | {m['ndcg@10']:.4f} ± {m['ndcg_se']:.4f}"


def markdown(r: dict) -> str:
    chosen, cold, mem, upd = r["chosen"], r["cold"], r["coread_memory"], r["updater"]
    lines = [f"Command: `{COMMAND}` ({r['uptime']['start']} at the start, {r['uptime']['end']} at the end). "
             f"goodbooks `to_read` leave-one-out, {r['test_users']} test users with ≥ 5 books (seed 0, one held out, "
             "their other books excluded); ± is one standard error.", "",
             "| recommender | HitRate@10 | NDCG@10 |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(m)} |" for name, m in r["rows"].items()]
    if "service" in r:
        s = r["service"]
        lines.append(f"| **the service** (embedded, real Redis; same training data through the event log and "
                     f"`POST /events`, asked over HTTP) | {fmt(s)} |")
    lines += ["", f"Blend weights chosen on {r['valid_users']} validation users (not test users): co-read weight "
              f"{chosen['coread_weight']}, support half {chosen['support_half']} interactions, the "
              f"{chosen['recent_books']} newest books and the {chosen['coread_per_book']} strongest co-read "
              f"neighbours of each, {chosen['coread_candidates']} co-read + "
              f"{chosen['content_candidates']} content candidates (grid in reports/recommendation.json).", "",
              f"Cold books: all interactions of {cold['hidden_books']} random books (10%, seed 2) hidden; "
              f"{cold['users']} test users whose held-out book is one of them.", "",
              "| cold books | recall@10 | NDCG@10 |", "|---|---|---|",
              f"| content only, ternary | {fmt(cold['content, ternary'])} |",
              f"| content only, full precision | {fmt(cold['content, full precision'])} |",
              f"| hybrid | {fmt(cold['hybrid'])} |",
              f"| hybrid, all {cold['hybrid, all test users']['users']} test users (cold books hidden) | "
              f"{fmt(cold['hybrid, all test users'])} |", "",
              f"Co-read model (recommender/store.py): window {r['store']['window']} newest books per event, "
              f"lists pruned to the {r['store']['keep']} strongest past {r['store']['cap']} neighbours. After the "
              f"full training data: {mem['items']} lists, {mem['entries']:,} entries (at most {mem['max_entries']} "
              f"per item), {mem['bytes'] / 2**20:.1f} MiB by `MEMORY USAGE` ({mem['bytes_per_item']:.0f} bytes per "
              f"item, {mem['bytes_per_entry']:.1f} per entry).", "",
              f"Profile updater against a real redis-server: {upd['events']:,} interaction events from the "
              f"in-process log in {upd['seconds']} s, **{upd['events_per_s']:,.0f} events/s** (seen check, recent "
              "list, profile vector, popularity and co-read counts, one transaction per poll of 500)."]
    if "embedded" in r:
        lines += ["", latency_line("Embedded service (fakeredis, in-process log, as `python -m recommender.demo "
                                   f"--users {r['embedded']['users']}`), each of its users once", r["embedded"])]
    if "service" in r:
        lines += ["", latency_line("The service above (in-process log, real redis-server), each test user once",
                                   r["service"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import secrets
    import subprocess

    from bench.report import update_section, write_json
    from ingest.services import LocalRedis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-users", type=int, default=N_TEST)
    parser.add_argument("--valid-users", type=int, default=N_VALID)
    parser.add_argument("--no-service", action="store_true", help="offline rows only")
    parser.add_argument("--embedded-users", type=int, default=2000, help="users in the embedded latency run")
    args = parser.parse_args(argv)
    def uptime() -> str:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def save(result: dict) -> None:  # after each phase: a later failure keeps what was measured
        result.update({"command": COMMAND, "test_users": len(split.test), "valid_users": len(split.valid),
                       "uptime": {"start": started, "end": uptime()}})
        write_json("recommendation", result)
        update_section("Recommendation quality", markdown(result))

    started = uptime()
    split = make_split(args.test_users, args.valid_users)
    emb = catalog_embeddings()
    with LocalRedis(password=secrets.token_urlsafe(12)) as server:
        result = offline(split, emb, server.url)
        save(result)
        if not args.no_service:
            result["service"] = service(split, server.url, BlendParams(**result["chosen"]))
            print("service:", result["service"], flush=True)
            save(result)
    if not args.no_service:
        result["embedded"] = embedded_latency(split, args.embedded_users, BlendParams(**result["chosen"]))
        print("embedded:", result["embedded"], flush=True)
        save(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
