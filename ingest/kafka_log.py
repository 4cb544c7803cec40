"""`KafkaLog`: the event-log interface of ingest/eventlog.py on a real Kafka cluster.

The one place that talks to Kafka (kafka-python). Producers are durable-by-default (acks=all,
unbounded retries within a delivery timeout, one request in flight so retries keep their order,
~5 ms batching) and surface a failed delivery at `flush()`, so a caller that flushes before
committing its input never loses a record. A retry may duplicate a record (see KafkaLogProducer).
Consumers are consumer-group members with manual, synchronous commits.

Nothing waits unboundedly for a broker that has gone away: a commit gives up after
`commit_timeout_ms` (the records are delivered again, as after a rebalance), and closing a
producer or a consumer after `close_timeout_ms`, so every service exits within 10 s of SIGTERM.
A producer made with `delivery_timeout_s` (the HTTP path) blocks in `send` and waits for
delivery no longer than that: a record the broker did not take by then fails for good.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import OffsetSpec
from kafka.coordinator.base import MemberState
from kafka.errors import (
    CommitFailedError,
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NotCoordinatorError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from ingest.eventlog import Record, Undelivered

log = logging.getLogger(__name__)
JOIN_POLL_MS = 100  # the shortest poll while a consumer joins or rejoins its group (see KafkaLogConsumer.poll)


class KafkaLog:
    """A Kafka cluster seen through the event-log interface (see ingest/eventlog.py)."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str = "ternrec",
        *,
        session_timeout_ms: int = 6000,
        heartbeat_interval_ms: int = 1000,
        commit_timeout_ms: int = 3000,
        close_timeout_ms: int = 1000,
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        # A worker killed with SIGKILL holds its partitions until its session times out; 6 s
        # (the broker's default minimum) instead of kafka-python's 45 s keeps failover quick.
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.commit_timeout_ms = commit_timeout_ms
        self.close_timeout_ms = close_timeout_ms
        self._admin: KafkaAdminClient | None = None
        self._admin_lock = threading.Lock()
        self._monitor: KafkaAdminClient | None = None  # backlog(): short timeouts, its own connection
        self._monitor_lock = threading.Lock()
        self._partitions: dict[str, int] = {}
        self._children: weakref.WeakSet[KafkaLogProducer | KafkaLogConsumer] = weakref.WeakSet()

    # -- topics ---------------------------------------------------------------------------
    def admin(self) -> KafkaAdminClient:
        with self._admin_lock:
            if self._admin is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                               client_id=f"{self.client_id}-admin")
            return self._admin

    def ensure_topics(self, names_partitions: dict[str, int], compacted: set[str]) -> None:
        """Creates the missing topics (those in `compacted` with cleanup.policy=compact) and
        waits until every partition of every named topic has a leader. Idempotent; another
        process creating the same topic at the same time is fine."""
        admin = self.admin()
        existing = set(admin.list_topics())
        missing = {
            name: {
                "num_partitions": count,
                # -1 = the broker's default.replication.factor (1 on a single node, 3 in prod).
                "replication_factor": -1,
                "configs": {"cleanup.policy": "compact"} if name in compacted else {},
            }
            for name, count in names_partitions.items()
            if name not in existing
        }
        if missing:
            result = admin.create_topics(missing, raise_errors=False)
            for topic in result["topics"]:
                code = topic.get("error_code", 0)
                if code == 0 or code == TopicAlreadyExistsError.errno:
                    continue  # created, or created concurrently by someone else
                raise KafkaError(f"creating topic {topic['name']!r} failed: error {code} "
                                 f"{topic.get('error_message') or ''}".strip())
        admin.wait_for_topics(list(names_partitions), timeout_ms=30_000)
        for name in set(names_partitions) & existing:
            have = self.partition_count(name)
            if have != names_partitions[name]:
                log.warning("topic %r exists with %d partitions (asked for %d); left as is",
                            name, have, names_partitions[name])

    def partition_count(self, topic: str) -> int:
        (info,) = self.admin().describe_topics([topic])
        if info.get("error_code", 0):
            raise KeyError(f"topic {topic!r} does not exist (ensure_topics creates it)")
        return len(info["partitions"])

    def backlog(self, group: str, topics: list[str]) -> dict[str, int]:
        """Per topic, end offset minus `group`'s committed offset summed over the partitions (from
        the log start where it committed nothing). Two broker round trips; raises KafkaError (or
        KafkaTimeoutError) within about `commit_timeout_ms` when the broker does not answer."""
        with self._monitor_lock:
            if self._monitor is None:
                timeout = self.commit_timeout_ms
                self._monitor = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                                 client_id=f"{self.client_id}-monitor",
                                                 request_timeout_ms=timeout, bootstrap_timeout_ms=timeout)
            monitor = self._monitor
            for topic in topics:
                if topic not in self._partitions:
                    (info,) = monitor.describe_topics([topic])
                    if info.get("error_code", 0):
                        raise KeyError(f"topic {topic!r} does not exist (ensure_topics creates it)")
                    self._partitions[topic] = len(info["partitions"])
            parts = [TopicPartition(t, p) for t in topics for p in range(self._partitions[t])]
            try:
                committed = monitor.list_group_offsets({group: parts}).get(group, {})
            except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
                # The broker answered, but its group coordinator is still settling: on a new broker
                # the offsets topic is created on first use, and no group has committed before that.
                committed = {}
            ends = monitor.list_partition_offsets({tp: OffsetSpec.LATEST for tp in parts})
            uncommitted = [tp for tp in parts if committed.get(tp) is None or committed[tp].offset < 0]
            starts = monitor.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in uncommitted}) \
                if uncommitted else {}
        out = dict.fromkeys(topics, 0)
        for tp in parts:
            start = starts[tp].offset if tp in starts else committed[tp].offset
            out[tp.topic] += max(0, ends[tp].offset - start)
        return out

    # -- clients --------------------------------------------------------------------------
    def producer(self, linger_ms: int = 5, delivery_timeout_s: float | None = None) -> KafkaLogProducer:
        p = KafkaLogProducer(self, linger_ms, delivery_timeout_s)
        self._children.add(p)
        return p

    def consumer(self, topics: list[str], group: str, from_beginning: bool = True) -> KafkaLogConsumer:
        c = KafkaLogConsumer(self, topics, group, from_beginning)
        self._children.add(c)
        return c

    def reader(self, topics: list[str]) -> KafkaLogConsumer:
        """Every partition of `topics` from the beginning, with no group: no coordinator, no
        heartbeats, no rebalances, nothing committed (see KafkaLogConsumer for why that matters)."""
        c = KafkaLogConsumer(self, topics, None, from_beginning=True)
        self._children.add(c)
        return c

    def close(self) -> None:
        """Closes the admin client and every producer/consumer this log handed out."""
        for child in list(self._children):
            with contextlib.suppress(Exception):
                child.close()
        for lock, name in ((self._admin_lock, "_admin"), (self._monitor_lock, "_monitor")):
            with lock:
                admin = getattr(self, name)
                if admin is not None:
                    with contextlib.suppress(Exception):
                        admin.close()
                    setattr(self, name, None)

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KafkaDelivery:
    """A sent record: done once the broker acknowledged it (acks=all) or delivery failed."""

    __slots__ = ("_future",)

    def __init__(self, future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.is_done

    def error(self) -> Exception | None:
        return self._future.exception if self._future.is_done else None

    def wait(self, timeout: float) -> None:
        try:
            self._future.get(timeout=timeout)
        except KafkaTimeoutError as exc:  # our wait, or the record's delivery timeout, ran out
            raise TimeoutError(f"record not acknowledged within {timeout:g} s") from exc
        except KafkaError as exc:
            raise Undelivered(f"record not delivered: {exc!r}") from exc


class KafkaLogProducer:
    """Sends bytes with an optional string key (the key picks the partition: murmur2, as Java)."""

    def __init__(self, owner: KafkaLog, linger_ms: int = 5, delivery_timeout_s: float | None = None) -> None:
        self._close_timeout_s = owner.close_timeout_ms / 1000
        if delivery_timeout_s is None:
            bounds = {"delivery_timeout_ms": 120_000, "max_block_ms": 30_000}
        else:  # the broker's answer (or a failure) within delivery_timeout_s, from send() on
            delivery_ms = max(int(delivery_timeout_s * 1000), linger_ms + 100)
            bounds = {"delivery_timeout_ms": delivery_ms, "request_timeout_ms": delivery_ms - linger_ms,
                      "max_block_ms": delivery_ms}
        self._producer = KafkaProducer(
            bootstrap_servers=owner.bootstrap,
            client_id=f"{owner.client_id}-producer",
            acks="all",
            # Not idempotent: kafka-python 3.0.12's idempotent producer, once a batch expires (the
            # broker away longer than delivery_timeout_ms), resets its producer id to -1 and never
            # gets a new one, so every later record expires too (seen: POST /events answered 503
            # for 60 s after the broker was back, in 5 of 9 outage-test runs; 0 of 5 since). One
            # request in flight keeps retries in order; a retry may duplicate a record, which
            # at-least-once allows and the consumers absorb (versioned item writes, the seen-set).
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            retries=2**31 - 1,  # bounded by delivery_timeout_ms instead
            linger_ms=linger_ms,  # 5 ms: small batches, throughput without hurting freshness
            batch_size=64 * 1024,
            # max_block_ms: send() blocks (bounded backpressure) when the buffer is full or the
            # topic's metadata is unknown
            allow_auto_create_topics=False,
            **bounds,
        )
        self._error: Exception | None = None
        self._failed = 0
        self._closed = False

    def _on_error(self, exc: Exception) -> None:
        # Runs on the I/O thread; the caller learns about it at the next flush().
        self._failed += 1
        if self._error is None:
            self._error = exc

    def send(self, topic: str, value: bytes, key: str | None = None) -> KafkaDelivery:
        """Raises TimeoutError when the producer could not take the record within its max_block_ms."""
        try:
            future = self._producer.send(topic, value=bytes(value), key=key.encode() if key is not None else None)
        except KafkaTimeoutError as exc:
            raise TimeoutError(f"the producer could not take a record for {topic!r}: {exc}") from exc
        future.add_errback(self._on_error)
        return KafkaDelivery(future)

    def flush(self, timeout: float | None = None) -> None:
        """Blocks until every record sent so far is acknowledged by the broker (acks=all);
        raises if any of them could not be delivered, TimeoutError if `timeout` s pass first."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError as exc:
            raise TimeoutError(f"records not acknowledged within {timeout} s") from exc
        self._raise_delivery_error()

    def _raise_delivery_error(self) -> None:
        if self._error is not None:
            error, failed = self._error, self._failed
            self._error, self._failed = None, 0
            raise KafkaError(f"{failed} record(s) not delivered: {error!r}") from error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Flushes what is buffered; past the timeout the rest fails, and the errback reports it below.
        self._producer.close(timeout=self._close_timeout_s)
        self._raise_delivery_error()


class KafkaLogConsumer:
    """A consumer-group member; offsets are committed only by `commit()`, synchronously.

    With `group` None, a reader of every partition (KafkaLog.reader). A replica's index needs
    every record, and a group of its own per replica brought kafka-python 3.0.12's coordinator
    along for nothing: with two replicas after a 10,000-item backfill, in 5 of 11 runs one
    replica's poll ran its fetch loop with a zero wait (the coordinator's time to the next
    heartbeat stuck at 0) and kept a core busy while idle, for minutes.
    """

    def __init__(self, owner: KafkaLog, topics: list[str], group: str | None, from_beginning: bool) -> None:
        self.group = group
        self._commit_timeout_ms = owner.commit_timeout_ms
        self._close_timeout_ms = owner.close_timeout_ms
        self._consumer = KafkaConsumer(
            bootstrap_servers=owner.bootstrap,
            client_id=f"{owner.client_id}-consumer",
            group_id=group,
            enable_auto_commit=False,  # at-least-once: the caller commits after its writes
            auto_offset_reset="earliest" if from_beginning else "latest",
            session_timeout_ms=owner.session_timeout_ms,
            heartbeat_interval_ms=owner.heartbeat_interval_ms,
            fetch_max_wait_ms=100,
            allow_auto_create_topics=False,
        )
        # Metadata first, then subscribe: a member that joins before it knows the topic's
        # partitions gets an empty assignment and waits for the next metadata refresh.
        partitions = {}
        for topic in topics:
            partitions[topic] = self._consumer.partitions_for_topic(topic)
            if not partitions[topic]:
                self._consumer.close(autocommit=False)
                raise KeyError(f"topic {topic!r} does not exist (ensure_topics creates it)")
        if group is None:
            self._consumer.assign([TopicPartition(t, p) for t, ps in partitions.items() for p in sorted(ps)])
        else:
            self._consumer.subscribe(list(topics))
        self._polled: dict[TopicPartition, int] = {}  # next offset after what poll returned
        self._committed: dict[TopicPartition, int] = {}
        self._closed = False

    def poll(self, max_records: int = 500, timeout_ms: int = 100) -> list[Record]:
        if self.group is not None and not self._in_stable_group():
            # Joining the group, or rejoining it for a rebalance: kafka-python 3.0.12 (pinned) does not
            # finish either reliably when polled with short timeouts. Measured on a 4-partition topic,
            # a member holding every partition while a second one joins: polled with 1 ms it kept them
            # all for 25 s in 8 of 8 trials (0 ms: 20 s in the one trial run); with 10 ms the split
            # took 1.2-17 s or never happened (2 of 8); with 30 and 100 ms it took 1.1-1.4 s in 8 of 8.
            # The worker polls its bulk lane with 0 while live events flow, so that lane would stall.
            timeout_ms = max(timeout_ms, JOIN_POLL_MS)
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Record] = []
        for tp, records in batches.items():
            for r in records:
                key = r.key.decode(errors="replace") if r.key is not None else None
                out.append(Record(r.topic, r.partition, r.offset, key, r.value or b"", r.timestamp))
            if records:
                self._polled[tp] = max(self._polled.get(tp, 0), records[-1].offset + 1)
        return out

    def _in_stable_group(self) -> bool:
        # The consumer has no public "rebalancing" flag; its coordinator has the member's state.
        coordinator = self._consumer._coordinator
        return (bool(self._consumer.assignment()) and coordinator.state is MemberState.STABLE
                and not coordinator.need_rejoin())

    def commit(self, records: list[Record] | None = None) -> None:
        """Commits offset+1 of the highest given record per partition (None: everything poll
        returned so far) and returns once the broker has stored them.

        Partitions that a rebalance has moved to another member are skipped, and a commit the
        group rejects because it rebalanced since our last poll, or that the broker does not take
        within the commit timeout (it is unreachable), is dropped (logged): in every case the records
        are delivered again from the last committed offset, which at-least-once allows and
        idempotent writes absorb. A commit never moves an offset back.
        """
        if self.group is None:
            raise TypeError("a reader belongs to no group: it has nothing to commit")
        if records is None:
            wanted = dict(self._polled)
        else:
            wanted = {}
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                wanted[tp] = max(wanted.get(tp, 0), r.offset + 1)
        assigned = self._consumer.assignment() or set()
        offsets = {
            tp: OffsetAndMetadata(pos, "", -1)
            for tp, pos in wanted.items()
            if tp in assigned and pos > self._committed.get(tp, -1)
        }
        if not offsets:
            return
        try:
            self._consumer.commit(offsets, timeout_ms=self._commit_timeout_ms)
        except (CommitFailedError, RebalanceInProgressError) as exc:  # rebalanced since, or rebalancing now
            log.warning("commit of %d partition(s) dropped, group %r rebalanced: %s",
                        len(offsets), self.group, exc)
            return
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            log.warning("commit of %d partition(s) dropped, group %r: broker unreachable: %s",
                        len(offsets), self.group, exc)
            return
        for tp, om in offsets.items():
            self._committed[tp] = om.offset

    def lag(self) -> int:
        """Records in this member's partitions that poll has not returned yet (one broker call)."""
        parts = list(self._consumer.assignment() or ())
        if not parts:
            return 0
        ends = self._consumer.end_offsets(parts, timeout_ms=self._commit_timeout_ms)
        return sum(max(0, ends[tp] - self._consumer.position(tp)) for tp in parts)

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this member owns now."""
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment() or ()}

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset of one partition, as the broker has it."""
        return self._consumer.committed(TopicPartition(topic, partition))

    def close(self) -> None:
        """Leaves the group at once (no waiting for a session timeout) without committing."""
        if self._closed:
            return
        self._closed = True
        self._consumer.close(autocommit=False, timeout_ms=self._close_timeout_ms)

