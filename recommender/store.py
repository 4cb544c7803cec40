"""The one place that talks to Redis: items, their embeddings, and user profiles.

Redis is the online source of truth. Layout (all keys under the configured prefix):
- `item:{id}`         hash: title, authors, year, tags (JSON), image_url, text, ts, event_id,
                      deleted ("0"/"1"), emb (float32 bytes). A delete leaves a tombstone so that a
                      late, older upsert cannot bring the item back.
- `items`             set of live item ids (what the index bootstraps from).
- `popular`           sorted set item id -> number of distinct users who interacted (cold start).
- `user:{id}:seen`    set of item ids the user interacted with (filtered out of recommendations).
- `user:{id}:recent`  list of the newest item ids, at most RECENT_ITEMS long.
- `user:{id}:profile` hash: vec (float32 bytes), ts (time of the last update).
- `user:{id}:pending` set of items interacted with before their embedding existed (the query side
                      folds them into the profile from the index).
- `coread:{id}`       sorted set neighbour id -> how many users interacted with both (the co-read
                      model, below).

The co-read model: each new interaction (u, i) adds 1 to the pair (i, j) in both `coread:i` and
`coread:j` for each j of u's COREAD_WINDOW newest books, and 1 to `popular[i]` (n_i, the item's
distinct users, which the cosine c_ij / sqrt(n_i n_j) of recommender/blend.py divides by). Memory is
bounded per item: when a list grows past COREAD_CAP neighbours it is cut back to its COREAD_KEEP
strongest (lowest counts go first; equal counts by id), so an item costs at most COREAD_CAP
entries (bytes per entry measured in BENCHMARKS.md, "Recommendation quality"), and a new pair
survives at least until COREAD_CAP - COREAD_KEEP other new neighbours arrive: that margin, the time
a new pair has to gather counts, is what the validation HitRate rewards most (a streaming
simulation of goodbooks: 100/50 -> 0.100, 128/100 -> 0.099, 200/100 -> 0.109, 300/200 -> 0.112,
reading the 50 strongest of the 20 newest books). An event costs 2 * min(window, books read)
ZINCRBYs and as many ZCARDs, in one Lua script queued in the batch's transaction. A query reads
a user's newest books' strongest neighbours and scores them in Redis (COREAD_SCORES_SCRIPT).

Writes are idempotent and ordered by version = (ts, event_id): an event older than the stored one
is skipped, the same event again rewrites the same values. A batch of item writes is one Lua script
(`ITEM_WRITE_LUA`: the version check and the writes of every item, atomically, in one round trip);
the profile writes use WATCH/MULTI so two writers never interleave. Embedded mode passes a fakeredis
client (with Lua): the same code runs.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ingest.schema import Interaction, ItemChange, ItemDelete, ItemUpsert, item_metadata
from recommender.stopping import StopRequested
from recommender.store_scripts import COREAD_SCORES_SCRIPT, COREAD_SCRIPT, ITEM_ARGS, ITEM_WRITE_LUA

RECENT_ITEMS = 50
COREAD_WINDOW = 50  # each new book is paired with the user's newest books, at most this many
COREAD_KEEP = 200  # neighbours kept per item after a prune
COREAD_CAP = 300  # a neighbour list is pruned when it grows past this

PROFILE_HALF_LIFE_S = 7 * 24 * 3600.0  # interests fade over weeks, not minutes
METADATA_FIELDS = ("title", "authors", "year", "tags", "image_url")



def open_redis(url: str, timeout_s: float = 5.0, retries: int | None = None) -> redis.Redis:
    """A client for a real Redis server, or an in-process one (fakeredis) when the URL is empty.

    `timeout_s` bounds each connect and each reply; `retries` (default: redis-py's, with back-off)
    how often a failed command is tried again: the HTTP path asks for none, so that a request
    never waits for an unreachable Redis longer than `timeout_s`.
    """
    if not url:
        import fakeredis

        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    bounds = {} if retries is None else {"retry": Retry(NoBackoff(), retries)}
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=10, **bounds)


@dataclass(frozen=True)
class UserProfile:
    vector: np.ndarray | None
    seen: set[str]
    recent: list[str]
    pending: set[str]


def _version(ts: float, event_id: str) -> tuple[float, str]:
    return (float(ts), event_id)


def _metadata(values: list[bytes | None]) -> dict:
    """METADATA_FIELDS as stored -> the shape of ingest.schema.item_metadata."""
    title, authors, year, tags, image_url = values
    return {"title": title.decode(), "authors": (authors or b"").decode(), "year": int(year) if year else None,
            "tags": json.loads(tags or b"[]"), "image_url": (image_url or b"").decode()}


def _decayed_sum(vec: np.ndarray | None, ts: float | None, emb: np.ndarray, now: float,
                 ) -> tuple[np.ndarray, float]:
    """The profile sum with `emb` added at time `now`, and the profile's new time."""
    emb = np.asarray(emb, dtype=np.float32)
    if vec is None:
        return emb.copy(), now
    last = max(ts, now)
    # Decay whichever side is older, so an out-of-order interaction weighs less.
    old_w = math.exp(-(last - ts) * math.log(2) / PROFILE_HALF_LIFE_S)
    new_w = math.exp(-(last - now) * math.log(2) / PROFILE_HALF_LIFE_S)
    return (vec * old_w + emb * new_w).astype(np.float32), last


class Store:
    def __init__(self, client: redis.Redis, prefix: str = "ternrec:"):
        self.r = client
        self.p = prefix
        self._write_items = client.register_script(ITEM_WRITE_LUA)  # EVALSHA, loaded again after a restart
        self._coread_script = client.register_script(COREAD_SCRIPT)
        self._coread_scores_script = client.register_script(COREAD_SCORES_SCRIPT)

    # -- keys ---------------------------------------------------------------------------------
    def _item(self, item_id: str) -> str:
        return f"{self.p}item:{item_id}"

    def _user(self, user_id: str, what: str) -> str:
        return f"{self.p}user:{user_id}:{what}"

    def _coread(self, item_id: str) -> str:
        return f"{self.p}coread:{item_id}"

    @property
    def _items(self) -> str:
        return f"{self.p}items"

    @property
    def _popular(self) -> str:
        return f"{self.p}popular"

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- items --------------------------------------------------------------------------------
    def stored_versions(self, item_ids: list[str]) -> dict[str, tuple[float, str]]:
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hmget(self._item(item_id), "ts", "event_id")
        out = {}
        for item_id, (ts, event_id) in zip(item_ids, pipe.execute(), strict=True):
            if ts is not None:
                out[item_id] = _version(float(ts), (event_id or b"").decode())
        return out

    def apply_item_events(self, events: list[tuple[ItemUpsert | ItemDelete, np.ndarray | None]],
                          lane: str = "live") -> list[ItemChange]:
        """Writes upserts (with their embeddings) and deletes not older than what is stored: one
        round trip (ITEM_WRITE_LUA), atomic. `events` holds at most one event per item; `lane` is the
        one they came through. Returns the changes applied, in order, metadata included."""
        if not events:
            return []
        keys = [self._items] + [self._item(e.item_id) for e, _ in events]
        args: list = []
        for event, emb in events:
            row = {"item_id": event.item_id, "ts": repr(event.ts), "event_id": event.event_id, "deleted": "1"}
            if isinstance(event, ItemUpsert):
                assert emb is not None, "an upsert needs its embedding"
                meta = item_metadata(event)
                row.update(meta, deleted="0", year=meta["year"] or "", tags=json.dumps(meta["tags"]),
                           text=event.encoder_text, emb=np.asarray(emb, dtype=np.float32).tobytes())
            args += [row.get(name, "") for name in ITEM_ARGS]
        written = self._write_items(keys=keys, args=args)
        changes = []
        for position in written:
            event, emb = events[int(position) - 1]
            deleted = isinstance(event, ItemDelete)
            changes.append(ItemChange(event.item_id, event.ts, event.event_id, deleted, emb,
                                      None if deleted else item_metadata(event), lane))
        return changes

    def item_count(self) -> int:
        return int(self.r.scard(self._items))

    def item_ids(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self._items))

    def items_metadata(self, item_ids: list[str]) -> list[dict | None]:
        """Title, authors, year, tags and image of each item (None for an unknown or deleted one)."""
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hmget(self._item(item_id), *METADATA_FIELDS, "deleted")
        return [None if values[0] is None or values[-1] == b"1" else _metadata(values[:-1])
                for values in pipe.execute()]

    def item_embeddings(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hmget(self._item(item_id), "emb", "deleted")
        return {item_id: np.frombuffer(emb, dtype=np.float32)
                for item_id, (emb, deleted) in zip(item_ids, pipe.execute(), strict=True)
                if emb is not None and deleted != b"1"}

    def iter_item_changes(self, batch: int = 1000) -> Iterator[ItemChange]:
        """Every live item with its embedding, metadata and version: what an index bootstraps from."""
        ids = self.item_ids()
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            pipe = self.r.pipeline(transaction=False)
            for item_id in chunk:
                pipe.hmget(self._item(item_id), "emb", "ts", "event_id", "deleted", *METADATA_FIELDS)
            for item_id, (emb, ts, event_id, deleted, *meta) in zip(chunk, pipe.execute(), strict=True):
                if emb is not None and deleted != b"1":
                    yield ItemChange(item_id, float(ts), event_id.decode(), False,
                                     np.frombuffer(emb, dtype=np.float32),
                                     _metadata(meta) if meta[0] is not None else None)

    # -- users and the co-read model -----------------------------------------------------------
    def apply_interactions(self, interactions: Iterable[Interaction],
                           embeddings: dict[str, np.ndarray]) -> int:
        """Records interactions; returns how many were new (a repeated one changes nothing).

        A batch is one optimistic transaction: WATCH the seen sets of its users, read their state
        in one round trip, decide in Python which interactions are new (in order, so a book read
        twice in one batch counts once), then one MULTI/EXEC writes everything. Every write to a
        user's keys adds to their seen set in the same transaction, so watching the seen sets is
        enough: a concurrent writer (a rebalance handing the partition over) makes EXEC fail and
        the batch is re-read, never applied twice.

        The profile vector is a time-decayed sum of the embeddings of the user's distinct items
        (half-life PROFILE_HALF_LIFE_S), so recent interests count more, an update is O(dim) with no
        history re-read, and its direction (what the index is searched with) is the decayed mean.
        Each new interaction also updates the co-read model (see COREAD_SCRIPT).
        """
        events = list(interactions)
        if not events:
            return 0
        users = sorted({e.user_id for e in events})
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*(self._user(u, "seen") for u in users))
                    state = self._users_state(users, events)
                    pipe.multi()
                    new = self._queue_interactions(pipe, events, state, embeddings)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue  # another writer touched one of these users: re-read and retry

    def _users_state(self, users: list[str], events: list[Interaction]) -> dict[str, dict]:
        """Per user: which of the batch's items were seen before, recent items, stored profile."""
        items_of: dict[str, list[str]] = {}
        for e in events:
            items_of.setdefault(e.user_id, []).append(e.item_id)
        read = self.r.pipeline(transaction=False)
        for user in users:
            read.smismember(self._user(user, "seen"), items_of[user])
            read.lrange(self._user(user, "recent"), 0, RECENT_ITEMS - 1)
            read.hmget(self._user(user, "profile"), "vec", "ts")
        replies = iter(read.execute())
        state = {}
        for user in users:
            flags, recent, (vec, ts) = next(replies), next(replies), next(replies)
            state[user] = {"seen": {i for i, f in zip(items_of[user], flags, strict=True) if f},
                           "recent": [r.decode() for r in recent],
                           "vec": None if vec is None else np.frombuffer(vec, dtype=np.float32),
                           "ts": None if ts is None else float(ts), "profile_changed": False}
        return state

    def _queue_interactions(self, pipe, events: list[Interaction], state: dict[str, dict],
                            embeddings: dict[str, np.ndarray]) -> int:
        new = 0
        for event in events:
            user = state[event.user_id]
            if event.item_id in user["seen"]:
                continue  # at-least-once delivery: this interaction is already counted
            new += 1
            user["seen"].add(event.item_id)
            window = user["recent"][:COREAD_WINDOW]  # recent is a subset of seen: never this item
            user["recent"] = [event.item_id, *user["recent"]][:RECENT_ITEMS]
            pipe.sadd(self._user(event.user_id, "seen"), event.item_id)
            pipe.lpush(self._user(event.user_id, "recent"), event.item_id)
            pipe.zincrby(self._popular, 1, event.item_id)
            if window:
                self._coread_script(keys=[self._coread(event.item_id), *map(self._coread, window)],
                                    args=[COREAD_KEEP, COREAD_CAP, event.item_id, *window], client=pipe)
            emb = embeddings.get(event.item_id)
            if emb is not None:
                user["vec"], user["ts"] = _decayed_sum(user["vec"], user["ts"], emb, event.ts)
                user["profile_changed"] = True
            else:  # the item is not encoded yet (events raced): fold it in at query time
                pipe.sadd(self._user(event.user_id, "pending"), event.item_id)
        for user_id, user in state.items():
            pipe.ltrim(self._user(user_id, "recent"), 0, RECENT_ITEMS - 1)
            if user["profile_changed"]:
                pipe.hset(self._user(user_id, "profile"),
                          mapping={"vec": user["vec"].tobytes(), "ts": repr(user["ts"])})
        return new

    def user_profile(self, user_id: str) -> UserProfile:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self._user(user_id, "profile"), "vec")
        pipe.smembers(self._user(user_id, "seen"))
        pipe.lrange(self._user(user_id, "recent"), 0, -1)
        pipe.smembers(self._user(user_id, "pending"))
        vec, seen, recent, pending = pipe.execute()
        return UserProfile(
            vector=None if vec is None else np.frombuffer(vec, dtype=np.float32),
            seen={s.decode() for s in seen}, recent=[r.decode() for r in recent],
            pending={p.decode() for p in pending})

    def coread_scores(self, recent: list[str], exclude: Iterable[str] = (), top: int = 100,
                      also_count: Iterable[str] = (), k: int = 50,
                      ) -> tuple[dict[str, tuple[float, str]], dict[str, float]]:
        """The co-read candidates of a user's recent books: j -> (cf(j), the recent book contributing
        most), for the `top` best by cf (more on a tie at the last place) among each book's k
        strongest neighbours, `exclude` left out; and the interaction count of the recent books, of
        those candidates and of `also_count` (the content candidates), absent when 0. One round
        trip (COREAD_SCORES_SCRIPT), the same figures as recommender/blend.py's formula."""
        exclude, also = list(exclude), list(also_count)
        reply = self._coread_scores_script(keys=[self._popular, *map(self._coread, recent)],
                                           args=[k, top, len(recent), len(exclude), *recent, *exclude, *also])
        n_recent, flat, n_also = reply
        support = {i: float(c) for i, c in zip(recent + also, list(n_recent) + list(n_also), strict=True) if c}
        scores = {}
        for a in range(0, len(flat), 4):
            j = flat[a].decode()
            scores[j] = (float(flat[a + 1]), flat[a + 2].decode())
            support[j] = float(flat[a + 3])
        return scores, support

    def interaction_counts(self, item_ids: list[str]) -> dict[str, float]:
        """Each item's distinct users (n_j of recommender/blend.py); absent when 0."""
        if not item_ids:
            return {}
        return {i: float(n) for i, n in zip(item_ids, self.r.zmscore(self._popular, item_ids), strict=True) if n}

    def popular(self, k: int, exclude: set[str] = frozenset()) -> list[tuple[str, float]]:
        """The most interacted-with live items (cold start)."""
        out = []
        for item_id, score in self.r.zrevrange(self._popular, 0, k + len(exclude) + 50, withscores=True):
            item_id = item_id.decode()
            if item_id not in exclude:
                out.append((item_id, score))
            if len(out) == k:
                break
        return out


def retry_while_unavailable(store: Store, operation, log, what: str, stop: threading.Event | None = None):
    """Runs `operation()` until Redis takes it, waiting for Redis between attempts.

    A consumer holds uncommitted offsets while it waits, so giving up would only mean reading the
    same events again later; waiting loses nothing. Once `stop` is set it gives up instead, with
    StopRequested: the caller leaves the operation's input uncommitted and exits.
    """
    while True:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis unavailable (%s); retrying %s", exc, what)
            try:
                wait_for_redis(store, timeout_s=5, stop=stop)
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if stop is not None and stop.is_set():
                raise StopRequested(f"stopping while Redis is unavailable; {what} not written") from exc


def wait_for_redis(store: Store, timeout_s: float = 30.0, stop: threading.Event | None = None) -> None:
    """Blocks until Redis answers (a worker started before Redis, or Redis restarting), at most
    `timeout_s` (then the last error), or until `stop` is set (then it returns)."""
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            store.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            stop.wait(0.2)
