"""Replay 10,000 items and 50,000 interactions into the event log and read them back.

Runs on the in-process log and on a real Kafka broker: a consumer group gets exactly the same
multiset of events, and 1,000 malformed messages mixed in all reach the dead-letter topic with a
reason while every valid event still arrives.
"""

import json
import uuid
from collections import Counter

import pytest

from ingest.eventlog import EventConsumer
from ingest.memory_log import InProcessLog
from ingest.replay import ResumeState, Selection, replay, selected_events
from ingest.settings import Settings

N_ITEMS, N_INTERACTIONS, N_MALFORMED = 10_000, 50_000, 1_000


def malformed_messages(settings: Settings) -> list[tuple[str, bytes, str]]:
    """(topic, value, expected reason) of each kind of bad input, 1,000 in all."""
    kinds = [
        (b"{broken json", "invalid JSON"),
        (b'{"type": "item_upsert", "title": "no id"}', "missing field 'item_id'"),
        (b'{"type": "item_upsert", "item_id": 5, "title": "x"}', "field 'item_id'"),
        (b'{"type": "item_teleport", "item_id": "1"}', "unknown event type"),
        (json.dumps({"type": "item_upsert", "item_id": "big", "title": "x",
                     "text": "y" * (settings.max_text_chars + 1)}).encode(), "over the limit"),
        (b"\x80\x81 binary", "invalid JSON"),
        (b'{"type": "interaction", "user_id": "u"}', "missing field 'item_id'"),
        (b"42", "must be a JSON object"),
    ]
    topics = [settings.topic_item_events, settings.topic_user_events]
    return [(topics[n % 2], *kinds[n % len(kinds)]) for n in range(N_MALFORMED)]


def read_all(consumer, expected: int, max_empty_polls: int = 50) -> list:
    out, empty = [], 0
    while len(out) < expected and empty < max_empty_polls:
        batch = consumer.poll(max_records=5000, timeout_ms=200)
        empty = 0 if batch else empty + 1
        out.extend(batch)
    return out


@pytest.fixture(params=["in-process", pytest.param("kafka", marks=pytest.mark.integration)])
def event_log_and_settings(request):
    prefix = uuid.uuid4().hex[:8]
    topics = {f"topic_{n}": f"{prefix}-{n.replace('_', '-')}"
              for n in ("item_events", "user_events", "item_embeddings", "dead_letter")}
    if request.param == "in-process":
        yield InProcessLog(), Settings(**topics)
        return
    from ingest.kafka_log import KafkaLog

    kafka = request.getfixturevalue("kafka")
    event_log = KafkaLog(kafka.bootstrap)
    yield event_log, Settings(kafka_bootstrap=kafka.bootstrap, **topics)
    event_log.close()


def test_replay_round_trip_with_dead_letters(event_log_and_settings, tmp_path):
    event_log, settings = event_log_and_settings
    events = selected_events(Selection(limit=N_ITEMS, users=5_000))
    items = events[:N_ITEMS]
    interactions = events[N_ITEMS:N_ITEMS + N_INTERACTIONS]
    assert len(interactions) == N_INTERACTIONS
    valid = items + interactions

    # The valid events in two resumable halves, the malformed ones sent between them.
    state = ResumeState(tmp_path / "state.json", Selection(limit=N_ITEMS), target="test")
    first = replay(event_log, settings, valid[:30_000], state=state, progress=False)
    bad = malformed_messages(settings)
    producer = event_log.producer()  # bytes as they are: what EventProducer never sends
    for topic, value, _ in bad:
        producer.send(topic, value, key="bad")
    producer.flush()
    producer.close()
    second = replay(event_log, settings, valid, state=state, progress=False)
    assert (first.sent, first.failed) == (30_000, 0)
    assert (second.skipped, second.sent, second.failed) == (30_000, len(valid) - 30_000, 0)

    consumer = EventConsumer(event_log, settings, [settings.topic_item_events, settings.topic_user_events],
                             group="readers")
    received = read_all(consumer, len(valid) + len(bad) - consumer.dead_lettered)
    consumer.commit()
    consumer.close()
    assert Counter(event.to_json() for _, event in received) == Counter(e.to_json() for e in valid)
    assert consumer.dead_lettered == N_MALFORMED

    dead = read_all(event_log.consumer([settings.topic_dead_letter], "dlq-readers"), N_MALFORMED)
    assert len(dead) == N_MALFORMED
    letters = [json.loads(r.value) for r in dead]
    reasons = Counter(letter["reason"].split(":")[0] for letter in letters)
    assert sum(reasons.values()) == N_MALFORMED
    expected = Counter(reason for _, _, reason in bad)
    for reason, count in expected.items():
        assert sum(1 for letter in letters if reason in letter["reason"]) >= count
    # The original bytes are kept: text as is, anything else base64-encoded.
    assert sum("value_b64" in letter for letter in letters) == N_MALFORMED // 8
