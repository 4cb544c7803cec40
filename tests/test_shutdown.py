"""Every service exits within 10 s of SIGTERM, even when Kafka or Redis has gone away.

The worker and the recommender run as real processes; the dependency that gets killed is a private
broker or a private redis-server (so that no other test is disturbed); after some work, the
dependency is SIGKILLed and both services get SIGTERM at the same moment (with Redis gone, while
the worker retries a batch it cannot write).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from ingest.eventlog import ensure_topics
from ingest.kafka_log import KafkaLog
from ingest.replay import Selection, replay, selected_events
from ingest.services import LocalKafka, free_port
from ingest.services.process import signal_group, stop_child
from ingest.settings import Settings
from recommender.store import Store, open_redis
from tests.processes import exit_seconds, healthy, settings_env, start_module
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXIT_WITHIN_S = 10.0
ITEMS = 200


@pytest.fixture
def private_kafka(kafka):  # `kafka` makes sure the jars are fetched
    broker = LocalKafka(Settings(), partitions=3)
    broker.start()
    yield broker
    broker.stop()


def start_services(env: dict[str, str], log_dir: Path) -> tuple[list[subprocess.Popen], dict[str, Path]]:
    """The worker and the recommender as processes that die with the test run."""
    logs = {name: log_dir / f"{name}.log" for name in ("worker", "recommender")}
    procs = [start_module("recommender.worker", env, logs["worker"]),
             start_module("recommender.service", env, logs["recommender"])]
    return procs, logs


def sigterm_and_wait(procs: list[subprocess.Popen], logs: dict[str, Path], when: str) -> str:
    """SIGTERM to both at the same moment; asserts both exit within EXIT_WITHIN_S; returns their log tails."""
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    took = exit_seconds(procs, timeout=EXIT_WITHIN_S)
    tails = "\n".join(f"--- {name}\n{path.read_text()[-3000:]}" for name, path in logs.items())
    assert None not in took, f"still running {EXIT_WITHIN_S:.0f} s after SIGTERM ({took}):\n{tails}"
    print(f"exit after SIGTERM {when}: worker {took[0]:.1f} s, recommender {took[1]:.1f} s")
    return tails


@pytest.mark.parametrize("gone", ["kafka", "redis"])
def test_worker_and_recommender_exit_within_10s_of_sigterm_with_a_dependency_down(
        gone, request, kafka_settings, make_redis, tmp_path):
    # Only the dependency that is killed is private; the other is the session's.
    broker = request.getfixturevalue("private_kafka") if gone == "kafka" else None
    redis_server = make_redis(password="pw")
    settings = kafka_settings.model_copy(update={"redis_url": redis_server.url, "max_wait_ms": 5,
                                                 **({"kafka_bootstrap": broker.bootstrap} if broker else {})})
    with KafkaLog(settings.kafka_bootstrap) as event_log:
        ensure_topics(event_log, settings)
        http_port = free_port()
        env = settings_env(settings, "hashing:384", TERNREC_HTTP_PORT=str(http_port))
        procs, logs = start_services(env, tmp_path)
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_for(lambda: healthy(url) and "consuming" in logs["worker"].read_text(), timeout=120,
                     what="worker and recommender up")
            replay(event_log, settings, selected_events(Selection(limit=ITEMS, users=5)), progress=False)
            store = Store(open_redis(settings.redis_url))
            wait_for(lambda: store.item_count() == ITEMS, timeout=60, what="the items encoded")

            (broker if gone == "kafka" else redis_server).kill()
            if gone == "redis":  # a batch in hand that cannot be written: the worker retries it
                replay(event_log, settings, selected_events(Selection(limit=ITEMS + 20, users=0))[ITEMS:],
                       progress=False)
                wait_for(lambda: "Redis unavailable" in logs["worker"].read_text(), timeout=30,
                         what="the worker retrying a batch")
            tails = sigterm_and_wait(procs, logs, f"with {gone} down")
            assert procs[0].returncode == 0, tails  # the worker
        finally:
            for proc in procs:
                stop_child(proc, timeout=1.0, graceful=False)


def test_worker_and_recommender_starting_without_a_broker_or_redis_exit_within_10s_of_sigterm(tmp_path):
    """Start-up waits (topics, Redis, model) end at once on SIGTERM, with exit code 0."""
    nobody = free_port()  # nothing listens there
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{nobody}", redis_url=f"redis://127.0.0.1:{nobody}/0")
    env = settings_env(settings, "hashing:384", TERNREC_HTTP_PORT=str(free_port()))
    procs, logs = start_services(env, tmp_path)
    try:
        wait_for(lambda: all("kafka" in path.read_text() for path in logs.values()), timeout=60,
                 what="both trying to reach the broker")
        assert [p.poll() for p in procs] == [None, None]
        tails = sigterm_and_wait(procs, logs, "while starting")
        assert [p.returncode for p in procs] == [0, 0], tails
    finally:
        for proc in procs:
            stop_child(proc, timeout=1.0, graceful=False)
