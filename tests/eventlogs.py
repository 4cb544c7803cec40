"""Reading and writing helpers shared by the event-log tests (contract, in-process, Kafka)."""

from __future__ import annotations

import time

from ingest.eventlog import EventLog, Record


def read(consumer, expected: int, timeout: float = 30.0) -> list[Record]:
    """Polls until `expected` records came (or `timeout` s passed)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        out += consumer.poll(max_records=1000, timeout_ms=200)
    return out


def drain(consumer, quiet: float = 1.5) -> list[Record]:
    """Everything the consumer gets until `quiet` seconds pass without a record."""
    out: list[Record] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        batch = consumer.poll(max_records=1000, timeout_ms=min(200, int(quiet * 1000)))
        if batch:
            out += batch
            last = time.monotonic()
    return out


def produce(event_log: EventLog, topic: str, pairs: list[tuple[str | None, bytes]]) -> None:
    p = event_log.producer()
    for key, value in pairs:
        p.send(topic, value, key=key)
    p.flush(timeout=30)
    p.close()


def wait_assigned(consumers, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Polls every member (none has records yet) until the group has settled: each member owns
    at least one partition, no two own the same one, and together they own all of them.

    During a rebalance a member that has not polled yet still reports its old assignment (seen:
    one member holding all four partitions while the other already had two), so the sum of the
    assignment sizes alone does not say the group has settled.
    """
    everything = {(topic, p) for p in range(partitions)}

    def settled() -> bool:
        owned = [c.assignment() for c in consumers]
        return all(owned) and sum(map(len, owned)) == partitions and set().union(*owned) == everything

    deadline = time.monotonic() + timeout
    while not settled():
        assert time.monotonic() < deadline, f"consumer group did not settle: {[c.assignment() for c in consumers]}"
        for c in consumers:
            assert c.poll(timeout_ms=50) == []
