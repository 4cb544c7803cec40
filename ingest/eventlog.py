"""The event-log interface, and the event-level producer/consumer built on it.

Two implementations share one interface: `KafkaLog` (ingest/kafka_log.py, a real broker) and
`InProcessLog` (ingest/memory_log.py, embedded mode). Both have topics with partitions, offsets
and consumer groups; a consumer commits offsets only when the caller says its work is durable.

`EventConsumer` adds the event semantics every consumer needs: it parses each record with the
one schema, sends a malformed one to the dead-letter topic with the reason (and counts it), and
hands the valid events to the caller, so one bad message never stops a consumer.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from ingest.schema import Event, InvalidEvent, Limits, parse_event, topic_for
from ingest.settings import Settings

log = logging.getLogger(__name__)
DEAD_LETTER_WAIT_S = 5.0  # longest a commit waits for its dead letters (the broker may be away)
WORKER_GROUP = "encoder-workers"  # the encoder workers' group on the live lane


def worker_group(lane: str, base: str = WORKER_GROUP) -> str:
    """The encoder workers' consumer group of one lane: a group per lane, so that each worker has a
    consumer per lane (recommender/worker.py says why) and a lane's rebalance never stalls the other."""
    return base if lane == "live" else f"{base}-{lane}"


class Undelivered(Exception):
    """The log refused a record or failed to deliver it (a timeout raises TimeoutError instead)."""


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp_ms: int


class Delivery(Protocol):
    """What `send` returns: whether the broker has acknowledged the record yet."""

    def done(self) -> bool: ...
    def error(self) -> Exception | None: ...
    # Returns once acknowledged; raises the delivery error, or TimeoutError when `timeout` s pass first.
    def wait(self, timeout: float) -> None: ...


class Producer(Protocol):
    def send(self, topic: str, value: bytes, key: str | None = None) -> Delivery: ...
    # Raises the error of a record that could not be delivered, TimeoutError when `timeout` s pass first.
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self) -> None: ...  # flushes within a bounded time; what is left undelivered fails


class Consumer(Protocol):
    def poll(self, max_records: int = 500, timeout_ms: int = 100) -> list[Record]: ...
    def commit(self, records: list[Record] | None = None) -> None: ...
    def lag(self) -> int: ...  # records in its partitions not yet returned by poll
    def assignment(self) -> set[tuple[str, int]]: ...  # the (topic, partition) pairs it owns now
    def committed(self, topic: str, partition: int) -> int | None: ...  # the group's offset, None if none
    def close(self) -> None: ...


class Reader(Protocol):
    """Every partition of its topics from the beginning, outside any consumer group (nothing to commit)."""

    def poll(self, max_records: int = 500, timeout_ms: int = 100) -> list[Record]: ...
    def lag(self) -> int: ...
    def close(self) -> None: ...


class EventLog(Protocol):
    def ensure_topics(self, names_partitions: dict[str, int], compacted: set[str]) -> None: ...
    # `delivery_timeout_s`: a record not acknowledged within it fails, and `send` blocks no longer
    # (the HTTP path); None: the log's durable default (retried for minutes).
    def producer(self, linger_ms: int = 5, delivery_timeout_s: float | None = None) -> Producer: ...
    def consumer(self, topics: list[str], group: str, from_beginning: bool = True) -> Consumer: ...
    def reader(self, topics: list[str]) -> Reader: ...  # what every replica's index follows
    # Per topic, the records a group has not committed yet (all of them when it committed nothing).
    def backlog(self, group: str, topics: list[str]) -> dict[str, int]: ...
    def close(self) -> None: ...


def open_event_log(settings: Settings) -> EventLog:
    """A real Kafka log when a bootstrap is configured, else the in-process log."""
    if settings.embedded_log:
        from ingest.memory_log import InProcessLog

        return InProcessLog()
    from ingest.kafka_log import KafkaLog

    return KafkaLog(settings.kafka_bootstrap)


def ensure_topics(event_log: EventLog, settings: Settings) -> None:
    """Creates the product's topics when missing (both lanes of item events); item-embeddings is
    log-compacted."""
    names = [settings.topic_item_events, settings.topic_item_backfill, settings.topic_user_events,
             settings.topic_item_embeddings, settings.topic_dead_letter]
    event_log.ensure_topics({name: settings.partitions for name in names},
                            compacted={settings.topic_item_embeddings})


class EventProducer:
    """Sends validated events to their topic, keyed for partitioning; item events in `lane`."""

    def __init__(self, event_log: EventLog, settings: Settings, lane: str = "live",
                 delivery_timeout_s: float | None = None, linger_ms: int = 5):
        settings.item_topic(lane)  # an unknown lane fails here, not at the first send
        self.settings = settings
        self.lane = lane
        self.producer = event_log.producer(linger_ms=linger_ms, delivery_timeout_s=delivery_timeout_s)

    def topic(self, event: Event) -> str:
        return topic_for(event, self.settings, self.lane)

    def send(self, event: Event) -> Delivery:
        return self.producer.send(self.topic(event), event.to_json(), key=event.key)

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout)

    def close(self) -> None:
        self.producer.close()


def dead_letter_payload(record: Record, reason: str) -> bytes:
    """The dead-letter message: the reason plus the original record, bytes kept losslessly."""
    payload = {"reason": reason, "topic": record.topic, "partition": record.partition,
               "offset": record.offset, "key": record.key, "failed_at": time.time()}
    try:
        payload["value"] = record.value.decode()
    except UnicodeDecodeError:
        payload["value_b64"] = base64.b64encode(record.value).decode()
    return json.dumps(payload).encode()


class EventConsumer:
    """Consumer-group reader of events; malformed records go to the dead-letter topic.

    `poll()` returns (record, event) pairs of valid events; `commit()` commits everything polled
    so far, dead-lettered records included, after flushing the dead-letter producer so a bad
    record is never lost between the two.
    """

    def __init__(self, event_log: EventLog, settings: Settings, topics: list[str], group: str,
                 from_beginning: bool = True):
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.consumer = event_log.consumer(topics, group, from_beginning=from_beginning)
        self.dead_letters = event_log.producer()
        self.dead_lettered = 0
        self.consumed = 0
        self._pending: list[Record] = []

    def poll(self, max_records: int = 500, timeout_ms: int = 100) -> list[tuple[Record, Event]]:
        records = self.consumer.poll(max_records=max_records, timeout_ms=timeout_ms)
        self._pending.extend(records)
        events = []
        for record in records:
            try:
                events.append((record, parse_event(record.value, self.limits)))
            except InvalidEvent as exc:
                self.dead_letter(record, str(exc))
        self.consumed += len(records)
        return events

    def dead_letter(self, record: Record, reason: str) -> None:
        """Sends a record the caller cannot process to the dead-letter topic, with the reason."""
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        self.dead_letters.send(self.settings.topic_dead_letter, dead_letter_payload(record, reason),
                               key=record.key)
        self.dead_lettered += 1

    def take_polled(self) -> list[Record]:
        """Every record polled since the last call (valid and dead-lettered), for a later commit."""
        records, self._pending = self._pending, []
        return records

    def commit(self, records: list[Record] | None = None) -> None:
        """Commits `records` (default: everything polled so far), dead letters flushed first.

        Dead letters not acknowledged within DEAD_LETTER_WAIT_S skip this commit: nothing is lost,
        as a later commit covering these offsets flushes every dead letter sent before it first.
        """
        if records is None:
            records = self.take_polled()
        if not records:
            return
        try:
            self.dead_letters.flush(DEAD_LETTER_WAIT_S)
        except TimeoutError:
            log.warning("dead letters not acknowledged within %.0f s; commit of %d record(s) skipped",
                        DEAD_LETTER_WAIT_S, len(records))
            return
        self.consumer.commit(records)

    def lag(self) -> int:
        return self.consumer.lag()

    def close(self) -> None:
        """Leaves the group; dead letters not delivered within the close timeout are dropped (their
        records were not committed, so they are read, and dead-lettered, again)."""
        try:
            self.dead_letters.close()
        finally:
            self.consumer.close()
