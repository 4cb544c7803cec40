"""What only KafkaLog has, against the session's real broker: commits another client sees at once,
topics created concurrently with their compaction config, delivery failures surfaced at flush.

The behaviour it shares with the in-process log is in test_event_log_contract.py.
"""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from ingest.kafka_log import KafkaLog
from tests.eventlogs import produce, read
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def test_a_commit_is_stored_by_the_broker_when_it_returns(kafka, kafka_log, name_prefix):
    topic, group = f"{name_prefix}-t", f"{name_prefix}-g"
    kafka_log.ensure_topics({topic: 3}, set())
    produce(kafka_log, topic, [(f"k{i}", b"%d" % i) for i in range(300)])
    consumer = kafka_log.consumer([topic], group)
    got = read(consumer, 300)
    assert len(got) == 300
    done = got[:120]
    consumer.commit(done)
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
    consumer.close()


def test_a_consumer_polled_without_waiting_still_joins_and_reads(kafka_log, name_prefix):
    # The worker polls its bulk lane with timeout 0 while live events flow; kafka-python alone
    # never completes a group join that way (every 0 ms poll started the join over).
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 3}, set())
    produce(kafka_log, topic, [(f"k{i}", b"%d" % i) for i in range(30)])
    consumer = kafka_log.consumer([topic], f"{name_prefix}-g")
    got = []
    wait_for(lambda: got.extend(consumer.poll(timeout_ms=0)) or len(got) >= 30, timeout=30,
             what="30 records from 0 ms polls")
    assert sorted(int(r.value) for r in got) == list(range(30))
    consumer.close()


def test_a_member_polled_without_waiting_still_gives_up_partitions_to_a_new_member(kafka_log, name_prefix):
    # The same for a rebalance: a member that already holds partitions and is polled only with
    # 0 ms must still rejoin, or the newcomer waits for ever and the partitions it should own stall.
    topic, group = f"{name_prefix}-t", f"{name_prefix}-g"
    kafka_log.ensure_topics({topic: 4}, set())
    first = kafka_log.consumer([topic], group)
    wait_for(lambda: first.poll(timeout_ms=0) is not None and len(first.assignment()) == 4, timeout=30,
             what="the first member owns all four partitions")
    second = kafka_log.consumer([topic], group)

    def split() -> bool:
        first.poll(timeout_ms=0)
        second.poll(timeout_ms=100)
        a, b = first.assignment(), second.assignment()
        return bool(a) and bool(b) and not (a & b) and len(a | b) == 4

    wait_for(split, timeout=30, what="the partitions split between the two members")
    first.close()
    second.close()


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    """The topic's non-default configuration, e.g. {"cleanup.policy": "compact"}."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        (configs,) = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="modified")["topic"].values()
    finally:
        admin.close()
    return {k: v["value"] if isinstance(v, dict) else v for k, v in configs.items()}


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
    assert topic_config(kafka.bootstrap, embeddings).get("cleanup.policy") == "compact"
    assert topic_config(kafka.bootstrap, events).get("cleanup.policy", "delete") == "delete"


def test_producer_flush_raises_when_delivery_fails(kafka_log, name_prefix):
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 1}, set())
    p = kafka_log.producer()
    # Over the broker's 1 MB max message size: rejected, and the caller must hear about it
    # before it commits the input that produced this record.
    with pytest.raises(Exception, match="(?i)too large|MessageSize|not delivered"):
        p.send(topic, b"x" * (2 * 1024 * 1024))
        p.flush(timeout=30)


def test_a_reader_joins_no_group_and_commits_nothing(kafka, kafka_log, name_prefix):
    topic = f"{name_prefix}-t"
    kafka_log.ensure_topics({topic: 2}, set())
    produce(kafka_log, topic, [(f"k{i}", b"%d" % i) for i in range(20)])
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        groups_before = {g["group_id"] for g in admin.list_groups()}
        reader = kafka_log.reader([topic])
        assert len(read(reader, 20)) == 20
        assert {g["group_id"] for g in admin.list_groups()} == groups_before
    finally:
        admin.close()
    with pytest.raises(TypeError, match="nothing to commit"):
        reader.commit()
    reader.close()
