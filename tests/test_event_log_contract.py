"""The EventLog contract (ingest/eventlog.py), run against both implementations.

`InProcessLog` (embedded mode) and `KafkaLog` on the session's real broker (integration tier) must
behave the same wherever the product relies on it: keys pick one partition, offsets are dense and
ordered, a group resumes after its commits and gets the uncommitted records again, members split
the partitions and take over those of a member that leaves, a `latest` group sees only what comes
after it joined, poll waits for records, lag counts what poll has not returned, and a missing
topic fails clearly. What only one of them has is tested in test_memory_log.py / test_kafka_log.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from ingest.eventlog import EventLog, Record
from ingest.memory_log import InProcessLog
from tests.eventlogs import drain, produce, read, wait_assigned
from tests.waiting import wait_for


@dataclass
class Case:
    log: EventLog
    prefix: str  # topics and groups of this test: the Kafka case shares its broker with other tests
    quiet: float  # seconds without a record that mean "nothing more is coming"

    def topic(self, partitions: int) -> str:
        name = f"{self.prefix}-t"
        self.log.ensure_topics({name: partitions}, set())
        return name

    def group(self, name: str = "g") -> str:
        return f"{self.prefix}-{name}"


@pytest.fixture(params=["in-process", pytest.param("kafka", marks=pytest.mark.integration)])
def case(request, name_prefix) -> Case:
    if request.param == "in-process":
        return Case(InProcessLog(), name_prefix, quiet=0.2)
    return Case(request.getfixturevalue("kafka_log"), name_prefix, quiet=1.5)


def test_keyed_records_round_trip_as_the_same_multiset(case):
    topic = case.topic(3)
    # Repeated keys and repeated (key, value) pairs: a multiset, not a set.
    sent = [(f"user-{i % 97}", b"v%d" % (i % 500)) for i in range(3000)] + [(None, b"no key")] * 5
    produce(case.log, topic, sent)
    c = case.log.consumer([topic], case.group())
    got = read(c, len(sent)) + drain(c, quiet=case.quiet)
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


def test_a_new_member_resumes_after_the_commits_and_gets_the_uncommitted_again(case):
    topic, group = case.topic(3), case.group()
    produce(case.log, topic, [(f"k{i}", b"%d" % i) for i in range(300)])

    first = case.log.consumer([topic], group)
    got = read(first, 300)
    assert len(got) == 300
    done = got[:120]  # the caller's work covers these only
    first.commit(done)
    want: dict[int, int] = {}
    for r in done:
        want[r.partition] = max(want.get(r.partition, 0), r.offset + 1)
    assert {p: first.committed(topic, p) for p in want} == want
    first.commit(got[:10])  # an older commit never moves an offset back
    assert {p: first.committed(topic, p) for p in want} == want
    first.close()

    second = case.log.consumer([topic], group)
    rest = drain(second, quiet=case.quiet)
    expected = {(r.partition, r.offset) for r in got if r.offset >= want.get(r.partition, 0)}
    assert {(r.partition, r.offset) for r in rest} == expected and len(rest) == len(expected)

    second.commit()  # None = everything polled so far
    second.close()
    third = case.log.consumer([topic], group)
    assert drain(third, quiet=case.quiet) == []
    produce(case.log, topic, [("late", b"late")])
    assert [(r.key, r.value) for r in read(third, 1)] == [("late", b"late")]


def test_members_split_the_partitions_and_one_takes_over_when_the_other_leaves(case):
    topic, group = case.topic(4), case.group()
    a, b = case.log.consumer([topic], group), case.log.consumer([topic], group)
    wait_assigned([a, b], topic, 4)
    assert a.assignment().isdisjoint(b.assignment())
    assert a.assignment() | b.assignment() == {(topic, p) for p in range(4)}

    sent = [(f"k{i}", b"%d" % i) for i in range(2000)]
    produce(case.log, topic, sent)
    results: dict[str, list[Record]] = {}

    def run(name, consumer):  # each consumer on its own thread (kafka-python is not thread-safe)
        results[name] = drain(consumer, quiet=max(case.quiet, 1.0))
        consumer.commit()

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got_a, got_b = results["a"], results["b"]
    assert got_a and got_b
    assert {r.partition for r in got_a}.isdisjoint({r.partition for r in got_b})
    assert Counter((r.key, r.value) for r in got_a + got_b) == Counter(sent)

    b.close()
    wait_assigned([a], topic, 4)  # b's partitions move to a, with nothing to redeliver (all committed)
    more = [(f"k{i}", b"more") for i in range(100)]
    produce(case.log, topic, more)
    assert Counter((r.key, r.value) for r in read(a, len(more))) == Counter(more)


def test_latest_sees_only_what_comes_after_and_groups_are_independent(case):
    topic = case.topic(2)
    produce(case.log, topic, [("old", b"old")] * 10)
    c = case.log.consumer([topic], case.group("late"), from_beginning=False)
    wait_assigned([c], topic, 2)
    time.sleep(0.3)  # let the position reset to the log end land before producing
    produce(case.log, topic, [("new", b"new")])
    assert [r.value for r in drain(c, quiet=case.quiet)] == [b"new"]
    assert len(read(case.log.consumer([topic], case.group("other")), 11)) == 11


def test_poll_waits_for_a_record_that_arrives_meanwhile(case):
    topic = case.topic(1)
    consumer = case.log.consumer([topic], case.group())
    wait_assigned([consumer], topic, 1)
    threading.Timer(0.05, lambda: produce(case.log, topic, [("k", b"late")])).start()
    assert [r.value for r in consumer.poll(timeout_ms=10_000)] == [b"late"]


def test_lag_counts_the_records_poll_has_not_returned(case):
    topic = case.topic(2)
    consumer = case.log.consumer([topic], case.group())
    wait_assigned([consumer], topic, 2)
    produce(case.log, topic, [(f"k{i}", b"x") for i in range(50)])
    assert consumer.lag() == 50
    assert len(read(consumer, 50)) == 50
    assert consumer.lag() == 0


def test_ensure_topics_is_idempotent(case):
    name = f"{case.prefix}-events"
    case.log.ensure_topics({name: 3}, set())
    case.log.ensure_topics({name: 3}, set())
    assert case.log.partition_count(name) == 3


def test_a_consumer_of_a_missing_topic_fails_clearly(case):
    with pytest.raises(KeyError, match="does not exist"):
        case.log.consumer([f"{case.prefix}-never-created"], case.group())


def test_backlog_counts_what_a_group_has_not_committed(case):
    topic, other = case.topic(3), f"{case.prefix}-other"
    case.log.ensure_topics({other: 2}, set())
    group = case.group()
    produce(case.log, topic, [(f"k{i}", b"x") for i in range(90)])
    assert case.log.backlog(group, [topic, other]) == {topic: 90, other: 0}  # nothing committed: all of it
    consumer = case.log.consumer([topic], group)
    got = read(consumer, 90)
    consumer.commit(got[:30])
    done = {}
    for r in got[:30]:
        done[r.partition] = max(done.get(r.partition, 0), r.offset + 1)
    assert case.log.backlog(group, [topic]) == {topic: 90 - sum(done.values())}
    consumer.commit()
    assert case.log.backlog(group, [topic]) == {topic: 0}


def test_a_send_can_be_waited_for(case):
    topic = case.topic(1)
    producer = case.log.producer(linger_ms=0, delivery_timeout_s=5.0)
    delivery = producer.send(topic, b"v", key="k")
    delivery.wait(10.0)
    assert delivery.done() and delivery.error() is None
    assert [r.value for r in read(case.log.consumer([topic], case.group()), 1)] == [b"v"]
    producer.close()


def test_readers_each_get_every_partition_from_the_beginning_outside_the_groups(case):
    # What every replica's index follows: each reader sees every record, the ones sent before it
    # started and after, whatever groups read the same topic meanwhile.
    topic = case.topic(3)
    produce(case.log, topic, [(f"k{i}", b"%d" % i) for i in range(60)])
    readers = [case.log.reader([topic]) for _ in range(2)]
    member = case.log.consumer([topic], case.group())
    produce(case.log, topic, [(f"k{i}", b"%d" % i) for i in range(60, 90)])
    for reader in readers:
        got = read(reader, 90) + drain(reader, quiet=case.quiet)
        assert sorted(int(r.value) for r in got) == list(range(90))
        assert reader.lag() == 0
    # The readers took nothing from the group: its one member owns every partition.
    assert len(read(member, 90)) == 90
    assert member.assignment() == {(topic, p) for p in range(3)}
    produce(case.log, topic, [("k", b"late")] * 4)
    wait_for(lambda: readers[0].lag() == 4, timeout=10, what="a reader's lag of the 4 records it has not read")
    for c in (*readers, member):
        c.close()
