"""Shared fixtures: one real Kafka broker and one real redis-server per test session.

- `kafka` / `redis_server`: session-scoped LocalKafka / LocalRedis (Redis with a password, so
  every integration test goes through the URL-with-password path). Started on first use only:
  a unit-test run never pays for them. The Kafka jars are fetched when missing, so plain
  `pytest` works on a fresh machine (with Java, Maven and redis-server installed).
- `name_prefix`: a unique prefix per test for topic and group names: tests share the broker and
  must not see each other's records or offsets.
- `kafka_log`: a KafkaLog on the session broker, closed after the test.
- `kafka_settings`: Settings with the bootstrap and this test's own topics (already created).
- `redis_url`: the session Redis, emptied (FLUSHALL) before the test.
- `stack_settings`: kafka_settings plus redis_url: what a worker/recommender test passes on.
- `make_redis`: a factory for a private LocalRedis (for tests that kill or restart Redis without
  disturbing anyone else's), stopped after the test.
- `private_kafka`: a private LocalKafka (for tests that kill the broker), stopped after the test.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Iterator

import pytest

from ingest.services import LocalKafka, LocalRedis, fetch_kafka_jars, kafka_jars_ready
from ingest.settings import Settings


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    settings = Settings()
    if not kafka_jars_ready(settings):
        fetch_kafka_jars(settings)
    broker = LocalKafka(settings, partitions=settings.partitions)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis(password=secrets.token_urlsafe(12))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def name_prefix(request) -> str:
    """e.g. 'test-commit-resume-3f9a1c2b': readable in broker logs, unique per test run."""
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka_log(kafka):
    from ingest.kafka_log import KafkaLog

    if not kafka.running:  # an earlier test killed the shared broker: same ports, same data
        kafka.start()

    log = KafkaLog(kafka.bootstrap)
    try:
        yield log
    finally:
        log.close()


@pytest.fixture
def kafka_settings(kafka, kafka_log, name_prefix) -> Settings:
    from ingest.eventlog import ensure_topics

    settings = Settings(
        kafka_bootstrap=kafka.bootstrap,
        redis_url="",
        topic_item_events=f"{name_prefix}-item-events",
        topic_item_backfill=f"{name_prefix}-item-backfill",
        topic_user_events=f"{name_prefix}-user-events",
        topic_item_embeddings=f"{name_prefix}-item-embeddings",
        topic_dead_letter=f"{name_prefix}-dead-letter",
    )
    ensure_topics(kafka_log, settings)
    return settings


@pytest.fixture
def redis_url(redis_server) -> str:
    if not redis_server.running:  # a test stopped the shared server: bring it back
        redis_server.start()
    with redis_server.client() as r:
        r.flushall()
    return redis_server.url


@pytest.fixture
def stack_settings(kafka_settings, redis_url) -> Settings:
    return kafka_settings.model_copy(update={"redis_url": redis_url})


@pytest.fixture
def make_redis() -> Iterator[Callable[..., LocalRedis]]:
    started: list[LocalRedis] = []

    def make(**kwargs) -> LocalRedis:
        server = LocalRedis(**kwargs)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def private_kafka(kafka) -> Iterator[LocalKafka]:  # `kafka` makes sure the jars are fetched
    broker = LocalKafka(Settings(), partitions=3)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def pytest_configure(config):
    # kafka-python 3.0.12 loads its protocol schemas with a deprecated importlib API, once per
    # message type: hundreds of warnings that are not ours to fix.
    for message in ("read_text is deprecated", "open_text is deprecated"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


@pytest.fixture
def embedded_runtime():
    """The production runtime in embedded mode (in-process log and store, workers included) on the
    model-free hashing encoder: the HTTP tests' service without Kafka, Redis or a model."""
    from encoder.hashing import HashingEncoder
    from recommender.runtime import Runtime

    rt = Runtime(Settings(kafka_bootstrap="", redis_url="", max_wait_ms=2), with_workers=True,
                 encoder=HashingEncoder(64))
    rt.start()
    yield rt
    rt.stop()
