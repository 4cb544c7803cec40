"""What only the in-process event log has: bounded memory, with Kafka's retention and compaction.

The behaviour it shares with KafkaLog is in test_event_log_contract.py.
"""

from ingest.memory_log import InProcessLog
from tests.eventlogs import drain


def test_retention_bounds_memory_and_compaction_keeps_newest_per_key():
    log = InProcessLog(max_records_per_partition=10)
    log.ensure_topics({"t": 3, "c": 2}, compacted={"c"})
    producer = log.producer()
    for n in range(100):
        producer.send("t", str(n).encode(), key="k")
        producer.send("c", str(n).encode(), key=f"k{n % 4}")
    plain = drain(log.consumer(["t"], "g"), quiet=0.1)
    assert [int(r.value) for r in plain] == list(range(90, 100))
    compacted = drain(log.consumer(["c"], "g"), quiet=0.1)
    latest = {r.key: int(r.value) for r in compacted}
    assert latest == {"k0": 96, "k1": 97, "k2": 98, "k3": 99}
