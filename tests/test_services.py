"""ingest.services on real processes: start, readiness, stop by PID, restart, nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ingest.services import (
    LocalKafka,
    ServiceError,
    fetch_kafka_jars,
    kafka_jars_ready,
    pid_alive,
)
from ingest.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.integration


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_redis_password_start_stop_leaves_nothing(make_redis):
    server = make_redis(password="p@ss/word:1")  # characters that need quoting in a URL
    pid, port, data_dir = server.pid, server.port, server.data_dir
    assert server.url == f"redis://:p%40ss%2Fword%3A1@127.0.0.1:{port}/0"
    with redis.Redis.from_url(server.url) as r:
        assert r.set("k", "v") and r.get("k") == b"v"
    no_retry = Retry(NoBackoff(), 0)  # redis-py retries AuthenticationError (a ConnectionError)
    with pytest.raises(redis.AuthenticationError), redis.Redis(port=port, retry=no_retry) as anon:
        anon.set("k", "x")
    assert "p@ss" not in Path(f"/proc/{pid}/cmdline").read_text()  # password kept out of `ps`
    server.stop()
    assert not pid_alive(pid) and not port_open(port) and not data_dir.exists()
    server.stop()  # idempotent


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_redis_restart_keeps_data_and_port(make_redis, graceful):
    # fsync every write so that even a SIGKILL loses nothing; SIGTERM flushes the AOF anyway.
    server = make_redis(password="pw", appendfsync="always" if not graceful else "everysec")
    port, old_pid = server.port, server.pid
    with server.client() as r:
        r.mset({f"item:{i}": i for i in range(1000)})
    server.restart(graceful=graceful)
    assert server.port == port and server.pid != old_pid and not pid_alive(old_pid)
    with server.client() as r:
        assert r.dbsize() == 1000 and r.get("item:999") == b"999"


def test_redis_fixed_port_in_use_fails_fast(make_redis):
    taken = make_redis()
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="exited"):
        make_redis(port=taken.port)
    assert time.monotonic() - t0 < 5


def test_children_die_with_a_killed_parent(tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed test process takes its redis-server with it."""
    script = (
        "import sys, time\n"
        "from ingest.services import LocalRedis\n"
        "r = LocalRedis().start()\n"
        "print(r.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert pid_alive(child)
    proc.kill()
    proc.wait()
    assert wait_gone(child), "redis-server outlived its SIGKILLed parent"


def test_kafka_jars_cache_reused_and_incomplete_download_redone(tmp_path):
    real = Settings()
    fetch_kafka_jars(real)
    settings = Settings(kafka_home=tmp_path / "kafka")
    shutil.copytree(real.kafka_home, settings.kafka_home, ignore=shutil.ignore_patterns(".lock"))
    stamp = settings.kafka_home / ".complete.json"
    mtime = stamp.stat().st_mtime_ns
    libs = fetch_kafka_jars(settings)  # complete: reused, nothing is redone
    assert kafka_jars_ready(settings) and stamp.stat().st_mtime_ns == mtime
    next(libs.glob("kafka-clients-*.jar")).unlink()  # as if a download stopped half-way
    assert not kafka_jars_ready(settings)
    fetch_kafka_jars(settings)  # Maven again (from its local repository: no network needed)
    assert kafka_jars_ready(settings) and any(libs.glob("kafka-clients-*.jar"))
    assert stamp.stat().st_mtime_ns != mtime


@pytest.mark.slow
def test_up_cli_then_restart_in_the_same_data_dirs(tmp_path):
    """`up` prints addresses and stops everything on SIGTERM; a LocalKafka started again on
    the same data dir and port finds the storage formatted and the records still there."""
    from ingest.kafka_log import KafkaLog

    kafka_dir, redis_dir = tmp_path / "kafka", tmp_path / "redis"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.services", "up", "--redis-password", "secret",
         "--kafka-dir", str(kafka_dir), "--redis-dir", str(redis_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C to stop" in out, out
        assert "secret" not in out and "started in" in out  # the password is redacted
        pids = [int(ln.split(" pid ")[1].split()[0]) for ln in lines if " pid " in ln]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        bootstrap = next(ln.split("=", 1)[1].strip() for ln in lines if "KAFKA_BOOTSTRAP=" in ln)
        with KafkaLog(bootstrap) as log:
            log.ensure_topics({"kept": 2}, set())
            p = log.producer()
            for i in range(10):
                p.send("kept", b"%d" % i, key=str(i))
            p.flush()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(wait_gone(p) for p in pids), "a service outlived `up`"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (kafka_dir / "data" / "meta.properties").exists() and (redis_dir / "redis.conf").exists()

    port = int(bootstrap.rsplit(":", 1)[1])
    broker = LocalKafka(data_dir=kafka_dir, port=port)
    try:
        broker.start()  # storage already formatted: kept, not formatted again
        with KafkaLog(broker.bootstrap) as log:
            c = log.consumer(["kept"], "g")
            got: list = []
            deadline = time.monotonic() + 30
            while len(got) < 10 and time.monotonic() < deadline:
                got += c.poll(timeout_ms=200)
        assert sorted(int(r.value) for r in got) == list(range(10))
        pid = broker.pid
    finally:
        broker.stop()
    assert wait_gone(pid, 0.1) and not port_open(port)
    assert kafka_dir.exists()  # a caller's data dir is kept


def test_a_service_started_from_a_short_lived_thread_outlives_the_thread(make_redis):
    """PDEATHSIG is per thread: starting from a worker thread must not tie Redis to it."""
    import threading

    servers = []
    t = threading.Thread(target=lambda: servers.append(make_redis()))
    t.start()
    t.join()
    time.sleep(0.5)
    assert pid_alive(servers[0].pid)
    with servers[0].client() as r:
        assert r.ping()


def test_losing_the_free_port_race_retries_on_another_port(make_redis, monkeypatch):
    """Another process grabs the port between our pick and the server's bind: start() notices
    the bind failure (not someone else's server answering) and retries on a fresh port."""
    from ingest.services import process

    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        picks = iter([taken])
        real_free_port = process.free_port
        monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": next(picks, None) or real_free_port(host))
        server = make_redis()
        assert server.port != taken and "Address already in use" in server.log_path.read_text()
        with server.client() as r:
            assert int(r.info("server")["process_id"]) == server.pid


def test_kafka_formats_with_a_cluster_id_that_starts_with_a_dash(monkeypatch, kafka):
    """One random id in 64 starts with '-'; the storage tool must not read it as a flag."""
    from ingest.services import kafka_broker

    monkeypatch.setattr(kafka_broker, "_cluster_id", lambda: "-" + "A" * 21)
    with LocalKafka(Settings()) as broker:
        assert broker.cluster_id == "-" + "A" * 21 and broker.running
