"""KafkaLog against the session's real broker: partitions, groups, commits, compaction config."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from kafka import KafkaAdminClient

from ingest.eventlog import Record
from ingest.kafka_log import KafkaLog

pytestmark = pytest.mark.integration


def read(consumer, expected: int, timeout: float = 30.0) -> list[Record]:
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
        batch = consumer.poll(max_records=1000, timeout_ms=200)
        if batch:
            out += batch
            last = time.monotonic()
    return out


def produce(kafka_log: KafkaLog, topic: str, pairs: list[tuple[str | None, bytes]]) -> None:
    p = kafka_log.producer()
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


def test_keyed_records_round_trip_as_the_same_multiset(kafka_log, name_prefix):
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 3}, set())
    # Repeated keys and repeated (key, value) pairs: a multiset, not a set.
    sent = [(f"user-{i % 97}", b"v%d" % (i % 500)) for i in range(3000)] + [(None, b"no key")] * 5
    produce(kafka_log, topic, sent)
    c = kafka_log.consumer([topic], f"{name_prefix}-g")
    got = read(c, len(sent)) + drain(c, quiet=0.5)
    assert Counter((r.key, r.value) for r in got) == Counter(sent)
    assert {r.partition for r in got} == {0, 1, 2}
    partitions_of: dict[str, set[int]] = {}
    for r in got:
        assert r.topic == topic and r.timestamp_ms > 0
        partitions_of.setdefault(r.key, set()).add(r.partition)
    assert all(len(ps) == 1 for k, ps in partitions_of.items() if k is not None)  # key -> one partition
    for p in range(3):  # offsets are dense and in order within a partition
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == list(range(len(offsets)))


def test_commit_is_synchronous_and_a_new_member_resumes_after_it(kafka, kafka_log, name_prefix):
    topic, group = f"{name_prefix}-t", f"{name_prefix}-g"
    kafka_log.ensure_topics({topic: 3}, set())
    produce(kafka_log, topic, [(f"k{i}", b"%d" % i) for i in range(300)])

    first = kafka_log.consumer([topic], group)
    got = read(first, 300)
    assert len(got) == 300
    done = got[:120]  # the caller's work covers these only
    first.commit(done)
    want = {}
    for r in done:
        want[r.partition] = max(want.get(r.partition, 0), r.offset + 1)
    # Synchronous: another client sees the offsets the moment commit() returns.
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        stored = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    assert {tp.partition: om.offset for tp, om in stored.items() if tp.topic == topic} == want
    first.commit(got[:10])  # an older commit never moves an offset back
    assert all(first.committed(topic, p) == o for p, o in want.items())
    first.close()

    second = kafka_log.consumer([topic], group)
    rest = drain(second)
    expected = {(r.partition, r.offset) for r in got if r.offset >= want.get(r.partition, 0)}
    assert {(r.partition, r.offset) for r in rest} == expected and len(rest) == len(expected)

    second.commit()  # None = everything polled so far
    second.close()
    third = kafka_log.consumer([topic], group)
    assert drain(third, quiet=1.0) == []
    produce(kafka_log, topic, [("late", b"late")])
    assert [(r.key, r.value) for r in read(third, 1)] == [("late", b"late")]


def test_two_members_of_a_group_split_the_partitions(kafka_log, name_prefix):
    topic, group = f"{name_prefix}-t", f"{name_prefix}-g"
    kafka_log.ensure_topics({topic: 4}, set())
    a, b = kafka_log.consumer([topic], group), kafka_log.consumer([topic], group)
    wait_assigned([a, b], topic, 4)
    assert a.assignment().isdisjoint(b.assignment())
    assert a.assignment() | b.assignment() == {(topic, p) for p in range(4)}

    sent = [(f"k{i}", b"%d" % i) for i in range(2000)]
    produce(kafka_log, topic, sent)
    results: dict[str, list[Record]] = {}

    def run(name, consumer):  # each consumer stays on its own thread (kafka-python is not thread-safe)
        results[name] = drain(consumer, quiet=2.0)

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got_a, got_b = results["a"], results["b"]
    assert got_a and got_b
    assert {r.partition for r in got_a}.isdisjoint({r.partition for r in got_b})
    assert Counter((r.key, r.value) for r in got_a + got_b) == Counter(sent)


def test_latest_skips_what_was_there_before(kafka_log, name_prefix):
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 2}, set())
    produce(kafka_log, topic, [("old", b"old")] * 10)
    c = kafka_log.consumer([topic], f"{name_prefix}-g", from_beginning=False)
    wait_assigned([c], topic, 2)
    time.sleep(0.3)  # let the position reset to the log end land before producing
    produce(kafka_log, topic, [("new", b"new")])
    assert [r.value for r in drain(c, quiet=1.0)] == [b"new"]


def test_ensure_topics_is_idempotent_concurrent_and_sets_compaction(kafka, kafka_log, name_prefix):
    events, embeddings = f"{name_prefix}-events", f"{name_prefix}-embeddings"
    wanted = {events: 3, embeddings: 2}
    errors: list[BaseException] = []

    def create():
        try:
            with KafkaLog(kafka.bootstrap) as log:
                log.ensure_topics(wanted, {embeddings})
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    kafka_log.ensure_topics(wanted, {embeddings})  # again: no-op
    assert kafka_log.partition_count(events) == 3 and kafka_log.partition_count(embeddings) == 2
    assert kafka_log.topic_config(embeddings).get("cleanup.policy") == "compact"
    assert kafka_log.topic_config(events).get("cleanup.policy", "delete") == "delete"


def test_producer_flush_raises_when_delivery_fails(kafka_log, name_prefix):
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 1}, set())
    p = kafka_log.producer()
    # Over the broker's 1 MB max message size: rejected, and the caller must hear about it
    # before it commits the input that produced this record.
    with pytest.raises(Exception, match="(?i)too large|MessageSize|not delivered"):
        p.send(topic, b"x" * (2 * 1024 * 1024))
        p.flush(timeout=30)


def test_consumer_of_a_missing_topic_fails_clearly(kafka_log, name_prefix):
    with pytest.raises(KeyError, match="does not exist"):
        kafka_log.consumer([f"{name_prefix}-never-created"], f"{name_prefix}-g")
