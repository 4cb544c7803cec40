"""Unit tests of the event schema: the good is accepted, each kind of bad named clearly."""

import json

import numpy as np
import pytest

from ingest.schema import (
    Interaction,
    InvalidEvent,
    ItemChange,
    ItemDelete,
    ItemUpsert,
    Limits,
    change_from_json,
    change_to_json,
    item_metadata,
    parse_event,
    topic_for,
)
from ingest.settings import Settings

UPSERT = {"type": "item_upsert", "item_id": "42", "title": "Dune", "text": "Dune by Frank Herbert"}


def test_valid_events_round_trip_and_get_ids_and_timestamps():
    for raw, cls, key in [
        (UPSERT, ItemUpsert, "42"),
        ({"type": "item_delete", "item_id": "42"}, ItemDelete, "42"),
        ({"type": "interaction", "user_id": "u1", "item_id": "42", "kind": "click"}, Interaction, "u1"),
    ]:
        event = parse_event(json.dumps(raw))
        assert isinstance(event, cls)
        assert event.key == key
        assert event.event_id and event.ts > 0 and event.schema_version == 1
        again = parse_event(event.to_json())
        assert again == event


def test_given_event_id_and_timestamp_are_kept_and_extra_fields_carried():
    event = parse_event({**UPSERT, "event_id": "e1", "ts": 12.5, "source": "test"})
    assert (event.event_id, event.ts) == ("e1", 12.5)
    assert json.loads(event.to_json())["source"] == "test"


def test_partition_topics():
    settings = Settings()
    assert topic_for(parse_event(UPSERT), settings) == settings.topic_item_events
    interaction = parse_event({"type": "interaction", "user_id": "u", "item_id": "i", "kind": "x"})
    assert topic_for(interaction, settings) == settings.topic_user_events


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ({"item_id": "1"}, "missing field 'type'"),
    ({"type": "item_rename", "item_id": "1"}, "unknown event type 'item_rename'"),
    ({"type": "item_upsert", "title": "x"}, "missing field 'item_id'"),
    ({"type": "interaction", "user_id": "u", "item_id": "i"}, "missing field 'kind'"),
    ({"type": "item_upsert", "item_id": 7, "title": "x"}, "field 'item_id': Input should be a valid string"),
    ({"type": "item_upsert", "item_id": "1", "title": "x", "ts": "yesterday"}, "field 'ts'"),
    ({"type": "item_upsert", "item_id": "", "title": "x"}, "field 'item_id'"),
    ({"type": "item_upsert", "item_id": "1", "title": ""}, "field 'title'"),
    ({"type": "item_upsert", "item_id": "1", "title": "x", "text": "a" * 101}, "text is 101 characters"),
    ({"type": "item_upsert", "item_id": "1", "title": "t" * 51}, "title is 51 characters"),
])
def test_bad_events_are_rejected_with_a_clear_reason(raw, reason):
    limits = Limits(max_event_bytes=1000, max_title_chars=50, max_text_chars=100)
    with pytest.raises(InvalidEvent) as err:
        parse_event(json.dumps(raw) if isinstance(raw, dict) else raw, limits)
    assert reason in str(err.value)


def test_oversized_event_is_rejected_not_truncated():
    raw = json.dumps({**UPSERT, "text": "x" * 5000})
    with pytest.raises(InvalidEvent, match=r"event is \d+ bytes, over the limit of 1000"):
        parse_event(raw, Limits(max_event_bytes=1000))


def test_item_changes_carry_metadata_and_lane_and_old_messages_still_decode():
    meta = {"title": "Dune", "authors": "Frank Herbert", "year": 1965, "tags": ["sf"], "image_url": ""}
    change = ItemChange("42", 10.5, "e1", False, np.arange(4, dtype=np.float32), meta, "bulk")
    back = change_from_json(change_to_json(change))
    assert (back.item_id, back.ts, back.event_id, back.deleted, back.metadata, back.lane) == \
        ("42", 10.5, "e1", False, meta, "bulk")
    np.testing.assert_array_equal(back.embedding, change.embedding)
    old = change_from_json(b'{"item_id": "7", "ts": 1.0, "event_id": "e", "deleted": true}')
    assert old.metadata is None and old.lane == "live" and old.embedding is None
    with pytest.raises(ValueError, match="unknown lane 'fast'"):
        change_from_json(b'{"item_id": "7", "ts": 1.0, "event_id": "e", "deleted": true, "lane": "fast"}')
    with pytest.raises(TypeError, match="metadata must be an object"):
        change_from_json(b'{"item_id": "7", "ts": 1.0, "event_id": "e", "deleted": false, "metadata": [1]}')


def test_item_events_go_to_their_lane():
    settings = Settings()
    event = parse_event(UPSERT)
    assert topic_for(event, settings, "bulk") == settings.topic_item_backfill
    assert topic_for(event, settings) == settings.topic_item_events
    assert item_metadata(parse_event({**UPSERT, "year": 0})) == {
        "title": UPSERT["title"], "authors": "", "year": None, "tags": [], "image_url": ""}
