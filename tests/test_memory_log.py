"""The in-process event log keeps Kafka's semantics: partitions, offsets, groups, retention."""

from ingest.memory_log import InProcessLog


def make_log(**kwargs) -> InProcessLog:
    log = InProcessLog(**kwargs)
    log.ensure_topics({"t": 3, "c": 2}, compacted={"c"})
    return log


def drain(consumer, max_records=1000):
    out = []
    while batch := consumer.poll(max_records=max_records, timeout_ms=0):
        out.extend(batch)
    return out


def test_keys_stay_on_one_partition_and_offsets_increase():
    log = make_log()
    producer = log.producer()
    for n in range(30):
        producer.send("t", str(n).encode(), key=f"k{n % 5}")
    records = drain(log.consumer(["t"], "g"))
    assert len(records) == 30
    by_key = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())
    for p in range(3):
        offsets = [r.offset for r in records if r.partition == p]
        assert offsets == list(range(len(offsets)))


def test_group_resumes_after_commit_and_redelivers_uncommitted():
    log = make_log()
    producer = log.producer()
    for n in range(10):
        producer.send("t", str(n).encode(), key="same")
    first = log.consumer(["t"], "g")
    batch = first.poll(max_records=4, timeout_ms=0)
    first.commit(batch)
    first.poll(max_records=3, timeout_ms=0)  # read but never committed
    first.close()
    second = log.consumer(["t"], "g")
    assert [r.value for r in drain(second)] == [str(n).encode() for n in range(4, 10)]


def test_members_of_a_group_split_partitions_and_rebalance_on_leave():
    log = make_log()
    a, b = log.consumer(["t"], "g"), log.consumer(["t"], "g")
    assert set(a.assignment).isdisjoint(b.assignment)
    assert len(a.assignment) + len(b.assignment) == 3
    b.close()
    assert len(a.assignment) == 3


def test_other_groups_and_latest_start_are_independent():
    log = make_log()
    log.producer().send("t", b"old", key="k")
    late = log.consumer(["t"], "late", from_beginning=False)
    log.producer().send("t", b"new", key="k")
    assert [r.value for r in drain(late)] == [b"new"]
    assert len(drain(log.consumer(["t"], "other"))) == 2


def test_retention_bounds_memory_and_compaction_keeps_newest_per_key():
    log = make_log(max_records_per_partition=10)
    producer = log.producer()
    for n in range(100):
        producer.send("t", str(n).encode(), key="k")
        producer.send("c", str(n).encode(), key=f"k{n % 4}")
    plain = drain(log.consumer(["t"], "g"))
    assert [int(r.value) for r in plain] == list(range(90, 100))
    compacted = drain(log.consumer(["c"], "g"))
    latest = {r.key: int(r.value) for r in compacted}
    assert latest == {"k0": 96, "k1": 97, "k2": 98, "k3": 99}


def test_poll_waits_for_new_records():
    import threading

    log = make_log()
    consumer = log.consumer(["t"], "g")
    threading.Timer(0.05, lambda: log.producer().send("t", b"late", key="k")).start()
    assert [r.value for r in consumer.poll(timeout_ms=2000)] == [b"late"]
