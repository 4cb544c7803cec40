"""The in-process event log of embedded mode: Kafka's semantics, in one process.

Topics have partitions (a record's partition is a stable hash of its key, else round-robin),
records get increasing offsets, consumer groups share partitions (range assignment, re-balanced
when a member joins or leaves) and resume from committed offsets; a member that leaves without
committing hands its records to the next owner again (at-least-once). Memory is bounded like
Kafka's retention: a partition keeps at most `max_records_per_partition` records; when full, a
compacted topic keeps the newest record per key and any other topic drops its oldest records, and a
consumer positioned before the log start resumes at the start (auto.offset.reset=earliest).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

from ingest.eventlog import Record


@dataclass
class _Partition:
    records: list[Record] = field(default_factory=list)
    start: int = 0  # offset of records[0]
    next_offset: int = 0

    def read(self, position: int, limit: int) -> list[Record]:
        if position < self.start:
            position = self.start
        begin = 0 if not self.records else _first_at_or_after(self.records, position)
        return self.records[begin:begin + limit]


def _first_at_or_after(records: list[Record], offset: int) -> int:
    lo, hi = 0, len(records)
    while lo < hi:  # offsets are increasing but may have gaps after compaction
        mid = (lo + hi) // 2
        if records[mid].offset < offset:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass
class _Topic:
    partitions: list[_Partition]
    compacted: bool


class InProcessLog:
    def __init__(self, max_records_per_partition: int = 2_000_000):
        self.max_records = max_records_per_partition
        self._topics: dict[str, _Topic] = {}
        self._committed: dict[str, dict[tuple[str, int], int]] = {}
        self._members: dict[str, list[InProcessConsumer]] = {}
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._round_robin = itertools.count()

    # -- topics -----------------------------------------------------------------------------
    def ensure_topics(self, names_partitions: dict[str, int], compacted: set[str]) -> None:
        with self._lock:
            for name, count in names_partitions.items():
                if name not in self._topics:
                    self._topics[name] = _Topic([_Partition() for _ in range(count)], name in compacted)

    def partition_count(self, topic: str) -> int:
        return len(self._topic(topic).partitions)

    def _topic(self, name: str) -> _Topic:
        try:
            return self._topics[name]
        except KeyError:
            raise KeyError(f"topic {name!r} does not exist (ensure_topics creates it)") from None

    # -- produce ----------------------------------------------------------------------------
    def append(self, topic: str, value: bytes, key: str | None) -> Record:
        with self._lock:
            t = self._topic(topic)
            if key is None:
                index = next(self._round_robin) % len(t.partitions)
            else:
                index = zlib.crc32(key.encode()) % len(t.partitions)
            part = t.partitions[index]
            record = Record(topic, index, part.next_offset, key, bytes(value), int(time.time() * 1000))
            part.records.append(record)
            part.next_offset += 1
            if len(part.records) > self.max_records:
                self._enforce_retention(t, part)
            self._appended.notify_all()
            return record

    def _enforce_retention(self, topic: _Topic, part: _Partition) -> None:
        if topic.compacted:
            latest = {r.key: r.offset for r in part.records}
            part.records = [r for r in part.records if latest[r.key] == r.offset]
        if len(part.records) > self.max_records:  # not compacted, or all keys distinct
            part.records = part.records[len(part.records) - self.max_records:]
        part.start = part.records[0].offset if part.records else part.next_offset

    def producer(self, linger_ms: int = 5, delivery_timeout_s: float | None = None) -> InProcessProducer:
        return InProcessProducer(self)  # appends are synchronous: nothing to bound

    def backlog(self, group: str, topics: list[str]) -> dict[str, int]:
        """Per topic, the records `group` has not committed (from the log start where it has none)."""
        with self._lock:
            committed = self._committed.get(group, {})
            return {name: sum(part.next_offset - max(part.start, committed.get((name, index), part.start))
                              for index, part in enumerate(self._topic(name).partitions))
                    for name in topics}

    # -- consume ----------------------------------------------------------------------------
    def consumer(self, topics: list[str], group: str, from_beginning: bool = True) -> InProcessConsumer:
        consumer = InProcessConsumer(self, topics, group, from_beginning)
        with self._lock:
            for name in topics:
                self._topic(name)
            self._members.setdefault(group, []).append(consumer)
            self._rebalance(group)
        return consumer

    def reader(self, topics: list[str]) -> InProcessConsumer:
        """A consumer alone in a private group: every partition, from the beginning."""
        return self.consumer(topics, f"reader-{uuid.uuid4().hex}")

    def _rebalance(self, group: str) -> None:
        """Range assignment of every subscribed partition over the group's members."""
        members = self._members.get(group, [])
        committed = self._committed.setdefault(group, {})
        for member in members:
            member.positions = {}
        for topic in sorted({t for m in members for t in m.topics}):
            subscribers = [m for m in members if topic in m.topics]
            for index in range(len(self._topics[topic].partitions)):
                owner = subscribers[index * len(subscribers) // len(self._topics[topic].partitions)]
                tp = (topic, index)
                default = 0 if owner.from_beginning else self._topics[topic].partitions[index].next_offset
                owner.positions[tp] = committed.get(tp, default)

    def _leave(self, consumer: InProcessConsumer) -> None:
        with self._lock:
            members = self._members.get(consumer.group, [])
            if consumer in members:
                members.remove(consumer)
                self._rebalance(consumer.group)

    def close(self) -> None:
        pass


class Delivered:
    """Appends are synchronous: every send is delivered when it returns."""

    def done(self) -> bool:
        return True

    def error(self) -> Exception | None:
        return None

    def wait(self, timeout: float) -> None:
        pass


DELIVERED = Delivered()


class InProcessProducer:
    def __init__(self, event_log: InProcessLog):
        self.log = event_log

    def send(self, topic: str, value: bytes, key: str | None = None) -> Delivered:
        self.log.append(topic, value, key)
        return DELIVERED

    def flush(self, timeout: float | None = None) -> None:
        pass  # appends are synchronous

    def close(self) -> None:
        pass


class InProcessConsumer:
    def __init__(self, event_log: InProcessLog, topics: list[str], group: str, from_beginning: bool):
        self.log = event_log
        self.topics = list(topics)
        self.group = group
        self.from_beginning = from_beginning
        self.positions: dict[tuple[str, int], int] = {}  # assigned partition -> next position
        self._closed = False

    def poll(self, max_records: int = 500, timeout_ms: int = 100) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        with self.log._lock:
            while True:
                out: list[Record] = []
                for tp, position in list(self.positions.items()):
                    if len(out) >= max_records:
                        break
                    part = self.log._topics[tp[0]].partitions[tp[1]]
                    records = part.read(position, max_records - len(out))
                    if records:
                        self.positions[tp] = records[-1].offset + 1
                        out.extend(records)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0 or self._closed:
                    return out
                self.log._appended.wait(remaining)

    def commit(self, records: list[Record] | None = None) -> None:
        with self.log._lock:
            committed = self.log._committed.setdefault(self.group, {})
            if records is None:
                positions = {tp: pos for tp, pos in self.positions.items()}
            else:
                positions = {}
                for r in records:
                    tp = (r.topic, r.partition)
                    positions[tp] = max(positions.get(tp, 0), r.offset + 1)
            for tp, pos in positions.items():
                committed[tp] = max(committed.get(tp, 0), pos)

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this member owns now."""
        with self.log._lock:
            return set(self.positions)

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset of one partition (None: nothing committed yet)."""
        with self.log._lock:
            return self.log._committed.get(self.group, {}).get((topic, partition))

    def lag(self) -> int:
        with self.log._lock:
            return sum(self.log._topics[t].partitions[p].next_offset - pos
                       for (t, p), pos in self.positions.items())

    def close(self) -> None:
        self._closed = True
        self.log._leave(self)
