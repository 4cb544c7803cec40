"""The one module of message schemas: the events, and the `item-embeddings` change message.

Events (item upserts, item deletes, user interactions) are JSON objects with a `type`
discriminator (docs/ARCHITECTURE.md, seams). Every event carries an `event_id`, a timestamp `ts`
(Unix seconds, float) and `schema_version`; the parser fills in the first two when they are
missing. Extra fields are kept. Oversized input is rejected with a reason, never truncated. Item
events are keyed by `item_id`, interactions by `user_id`.

An `ItemChange` is what the encoder worker applied for one item (an upsert with its embedding, or
a delete): it goes onto the compacted `item-embeddings` topic, keyed by `item_id`, as JSON with the
embedding in base64 float32 (`change_to_json` / `change_from_json`).
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
MAX_ID_CHARS = 256


class InvalidEvent(ValueError):
    """Raised with a one-line human-readable reason for any event that cannot be accepted."""


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int = 64 * 1024
    max_title_chars: int = 1000
    max_text_chars: int = 8000

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_event_bytes, settings.max_title_chars, settings.max_text_chars)


DEFAULT_LIMITS = Limits()

# No control characters, no space at either end. Spelled with explicit ranges (no \s or .) so that
# every regex engine reading the JSON Schema (Python's, Rust's, ECMA's in clients) agrees on it.
ID_PATTERN = r"^[^\x00-\x20\x7f]([^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]


class _EventBase(BaseModel):
    # python-re: the same regex semantics as the JSON Schema clients (and fuzzers) validate against;
    # no NaN/Infinity: they have no JSON form, so the event could not be written to a topic as it came.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True, regex_engine="python-re",
                              allow_inf_nan=False)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=MAX_ID_CHARS)
    ts: float = Field(default_factory=time.time, ge=0)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ItemUpsert(_EventBase):
    type: Literal["item_upsert"]
    item_id: Id
    title: str = Field(min_length=1)
    text: str | None = None
    authors: str | None = None
    year: int | None = None
    tags: list[str] | None = None
    image_url: str | None = None

    @property
    def key(self) -> str:
        return self.item_id

    @property
    def encoder_text(self) -> str:
        """What the encoder embeds: the full text when given, else the title."""
        return self.text or self.title


class ItemDelete(_EventBase):
    type: Literal["item_delete"]
    item_id: Id

    @property
    def key(self) -> str:
        return self.item_id


class Interaction(_EventBase):
    type: Literal["interaction"]
    user_id: Id
    item_id: Id
    kind: str = Field(min_length=1, max_length=64)

    @property
    def key(self) -> str:
        return self.user_id


Event = Annotated[ItemUpsert | ItemDelete | Interaction, Field(discriminator="type")]
ItemEvent = ItemUpsert | ItemDelete
EVENT_TYPES = ("item_upsert", "item_delete", "interaction")
_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        # The discriminated union puts the event type first in the location; drop it.
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in EVENT_TYPES:
            loc = loc[1:]
        where = ".".join(loc) or "event"
        if err["type"] == "missing":
            parts.append(f"missing field '{where}'")
        elif err["type"] == "string_pattern_mismatch" and err["ctx"].get("pattern") == ID_PATTERN:
            parts.append(f"field '{where}': an id may not contain control characters or start or end "
                         "with a space")
        else:
            parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_event(raw: bytes | str | dict, limits: Limits = DEFAULT_LIMITS) -> Event:
    """Parses and validates one event; raises InvalidEvent with the reason."""
    if isinstance(raw, (bytes, bytearray, str)):
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > limits.max_event_bytes:
            raise InvalidEvent(f"event is {size} bytes, over the limit of {limits.max_event_bytes}")
        try:
            text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"invalid JSON: an event must be UTF-8 ({exc})") from None
        try:
            data = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
        except RecursionError:
            raise InvalidEvent("invalid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, and numbers Python will not parse
            raise InvalidEvent(f"invalid JSON: {exc}") from None
        if "\\u" in text:  # an escaped lone surrogate is valid JSON but no Unicode text
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidEvent("invalid JSON: a \\u escape is not a whole Unicode character") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if kind is None:
        raise InvalidEvent("missing field 'type'")
    if kind not in EVENT_TYPES:
        raise InvalidEvent(f"unknown event type {kind!r}; expected one of {', '.join(EVENT_TYPES)}")
    try:
        event = _event_adapter.validate_python(data)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None
    if isinstance(event, ItemUpsert):
        if len(event.title) > limits.max_title_chars:
            raise InvalidEvent(f"title is {len(event.title)} characters, over the limit of "
                               f"{limits.max_title_chars}")
        if event.text is not None and len(event.text) > limits.max_text_chars:
            raise InvalidEvent(f"text is {len(event.text)} characters, over the limit of "
                               f"{limits.max_text_chars}")
    return event


def event_json_schemas(limits: Limits = DEFAULT_LIMITS) -> dict[str, dict]:
    """JSON Schemas of the events accepted under `limits`, for an OpenAPI document's components:
    "Event" (the union, discriminated by `type`) and one per event type. The byte limit has no JSON
    Schema form; it is stated in the description."""
    schema = _event_adapter.json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs")
    upsert = defs["ItemUpsert"]["properties"]
    upsert["title"]["maxLength"] = limits.max_title_chars
    upsert["text"]["anyOf"][0]["maxLength"] = limits.max_text_chars
    schema["description"] = (f"One event, a UTF-8 JSON object of at most {limits.max_event_bytes} bytes. "
                             "`event_id` and `ts` are filled in when missing; other fields are kept.")
    return {"Event": schema, **defs}


def topic_for(event: Event, settings) -> str:
    """Item events go to the item topic, interactions to the user topic."""
    return settings.topic_user_events if isinstance(event, Interaction) else settings.topic_item_events


@dataclass(frozen=True)
class ItemChange:
    """An applied item upsert or delete, as published on `item-embeddings`."""

    item_id: str
    ts: float
    event_id: str
    deleted: bool
    embedding: np.ndarray | None = None


def change_to_json(change: ItemChange) -> bytes:
    """The `item-embeddings` message: the change, embedding as base64 float32."""
    payload = {"item_id": change.item_id, "ts": change.ts, "event_id": change.event_id,
               "deleted": change.deleted}
    if change.embedding is not None:
        payload["embedding"] = base64.b64encode(np.asarray(change.embedding, np.float32).tobytes()).decode()
    return json.dumps(payload).encode()


def change_from_json(value: bytes) -> ItemChange:
    data = json.loads(value)
    emb = data.get("embedding")
    return ItemChange(data["item_id"], float(data["ts"]), data["event_id"], bool(data["deleted"]),
                      None if emb is None else np.frombuffer(base64.b64decode(emb), dtype=np.float32))
