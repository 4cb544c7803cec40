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

Writes are idempotent and ordered by version = (ts, event_id): an event older than the stored one
is skipped, the same event again rewrites the same values. Multi-key writes use WATCH/MULTI so
two writers never interleave. Embedded mode passes a fakeredis client: the same code runs.
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

from ingest.schema import Interaction, ItemChange, ItemDelete, ItemUpsert
from recommender.stopping import StopRequested

RECENT_ITEMS = 50
PROFILE_HALF_LIFE_S = 7 * 24 * 3600.0  # interests fade over weeks, not minutes


def open_redis(url: str) -> redis.Redis:
    """A client for a real Redis server, or an in-process one (fakeredis) when the URL is empty."""
    if not url:
        import fakeredis

        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                health_check_interval=10)


@dataclass(frozen=True)
class UserProfile:
    vector: np.ndarray | None
    seen: set[str]
    recent: list[str]
    pending: set[str]


def _version(ts: float, event_id: str) -> tuple[float, str]:
    return (float(ts), event_id)


class Store:
    def __init__(self, client: redis.Redis, prefix: str = "ternrec:"):
        self.r = client
        self.p = prefix

    # -- keys ---------------------------------------------------------------------------------
    def _item(self, item_id: str) -> str:
        return f"{self.p}item:{item_id}"

    def _user(self, user_id: str, what: str) -> str:
        return f"{self.p}user:{user_id}:{what}"

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
                          ) -> list[ItemChange]:
        """Writes upserts (with their embeddings) and deletes not older than what is stored.

        `events` holds at most one event per item. Returns the changes applied, in order.
        """
        if not events:
            return []
        keys = [self._item(e.item_id) for e, _ in events]
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    stored = self.stored_versions([e.item_id for e, _ in events])
                    applied = [(e, emb) for e, emb in events
                               if e.item_id not in stored
                               or _version(e.ts, e.event_id) >= stored[e.item_id]]
                    pipe.multi()
                    for event, emb in applied:
                        self._queue_item_write(pipe, event, emb)
                    pipe.execute()
                except redis.WatchError:
                    continue  # another writer touched one of these items: re-read and retry
            return [ItemChange(e.item_id, e.ts, e.event_id, isinstance(e, ItemDelete), emb)
                    for e, emb in applied]

    def _queue_item_write(self, pipe, event: ItemUpsert | ItemDelete, emb: np.ndarray | None) -> None:
        key = self._item(event.item_id)
        if isinstance(event, ItemDelete):
            pipe.delete(key)
            pipe.hset(key, mapping={"ts": repr(event.ts), "event_id": event.event_id, "deleted": "1"})
            pipe.srem(self._items, event.item_id)
            return
        assert emb is not None, "an upsert needs its embedding"
        fields = {
            "title": event.title, "authors": event.authors or "", "year": event.year or "",
            "tags": json.dumps(event.tags or []), "image_url": event.image_url or "",
            "text": event.encoder_text, "ts": repr(event.ts), "event_id": event.event_id,
            "deleted": "0", "emb": np.asarray(emb, dtype=np.float32).tobytes(),
        }
        pipe.hset(key, mapping=fields)
        pipe.sadd(self._items, event.item_id)

    def item_count(self) -> int:
        return int(self.r.scard(self._items))

    def item_ids(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self._items))

    def items_metadata(self, item_ids: list[str]) -> list[dict | None]:
        """Title, authors, year, tags and image of each item (None for an unknown or deleted one)."""
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hmget(self._item(item_id), "title", "authors", "year", "tags", "image_url", "deleted")
        out: list[dict | None] = []
        for title, authors, year, tags, image_url, deleted in pipe.execute():
            if title is None or deleted == b"1":
                out.append(None)
                continue
            out.append({"title": title.decode(), "authors": (authors or b"").decode(),
                        "year": int(year) if year else None, "tags": json.loads(tags or b"[]"),
                        "image_url": (image_url or b"").decode()})
        return out

    def item_embeddings(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hmget(self._item(item_id), "emb", "deleted")
        return {item_id: np.frombuffer(emb, dtype=np.float32)
                for item_id, (emb, deleted) in zip(item_ids, pipe.execute(), strict=True)
                if emb is not None and deleted != b"1"}

    def iter_item_changes(self, batch: int = 1000) -> Iterator[ItemChange]:
        """Every live item with its embedding and version: what an index bootstraps from."""
        ids = self.item_ids()
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            pipe = self.r.pipeline(transaction=False)
            for item_id in chunk:
                pipe.hmget(self._item(item_id), "emb", "ts", "event_id", "deleted")
            for item_id, (emb, ts, event_id, deleted) in zip(chunk, pipe.execute(), strict=True):
                if emb is not None and deleted != b"1":
                    yield ItemChange(item_id, float(ts), event_id.decode(), False,
                                     np.frombuffer(emb, dtype=np.float32))

    # -- users --------------------------------------------------------------------------------
    def apply_interactions(self, interactions: Iterable[Interaction],
                           embeddings: dict[str, np.ndarray]) -> int:
        """Records interactions; returns how many were new (a repeated one changes nothing).

        The profile vector is a time-decayed sum of the embeddings of the user's distinct items
        (half-life PROFILE_HALF_LIFE_S), so recent interests count more, an update is O(dim) with no
        history re-read, and its direction (what the index is searched with) is the decayed mean.
        """
        new = 0
        for event in interactions:
            new += self._apply_interaction(event, embeddings.get(event.item_id))
        return new

    def _apply_interaction(self, event: Interaction, emb: np.ndarray | None) -> int:
        seen, recent, profile, pending = (self._user(event.user_id, w)
                                          for w in ("seen", "recent", "profile", "pending"))
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(seen, profile)
                    if pipe.sismember(seen, event.item_id):
                        return 0  # at-least-once delivery: this interaction is already counted
                    vec, ts = pipe.hmget(profile, "vec", "ts")
                    pipe.multi()
                    pipe.sadd(seen, event.item_id)
                    pipe.lpush(recent, event.item_id)
                    pipe.ltrim(recent, 0, RECENT_ITEMS - 1)
                    pipe.zincrby(self._popular, 1, event.item_id)
                    if emb is not None:
                        pipe.hset(profile, mapping=self._updated_profile(vec, ts, emb, event.ts))
                    else:  # the item is not encoded yet (events raced): fold it in at query time
                        pipe.sadd(pending, event.item_id)
                    pipe.execute()
                    return 1
                except redis.WatchError:
                    continue

    @staticmethod
    def _updated_profile(vec: bytes | None, ts: bytes | None, emb: np.ndarray, now: float) -> dict:
        total = np.asarray(emb, dtype=np.float32).copy()
        last = now
        if vec is not None:
            last = max(float(ts), now)
            # Decay whichever side is older, so an out-of-order interaction weighs less.
            old_w = math.exp(-(last - float(ts)) * math.log(2) / PROFILE_HALF_LIFE_S)
            new_w = math.exp(-(last - now) * math.log(2) / PROFILE_HALF_LIFE_S)
            total = np.frombuffer(vec, dtype=np.float32) * old_w + total * new_w
        return {"vec": total.astype(np.float32).tobytes(), "ts": repr(last)}

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
