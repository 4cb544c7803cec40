"""`make stack` end to end: real services come up, a dead service is restarted, and SIGTERM stops
every process the stack started."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ingest.services import free_port, pid_alive

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def read_until(proc, log_lines, pattern, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        log_lines.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(log_lines)}")


def test_stack_serves_restarts_and_stops_cleanly(kafka):  # `kafka` makes sure the jars are fetched
    http_port = free_port()
    env = {**os.environ, "TERNREC_HTTP_PORT": str(http_port), "TERNREC_UI_PORT": str(free_port()),
           "TERNREC_ENCODER": "hashing:384", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recommender.stack", "--no-ui", "--users", "20"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        read_until(proc, lines, r"\[stack\] ready", timeout=180)
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        pids = {m.group(1): int(m.group(2))
                for m in re.finditer(r"started (\S+) \(pid (\d+)", "".join(lines))}
        assert {"worker-1", "recommender", "replay"} <= pids.keys()
        kafka_redis = [int(p) for p in re.findall(r"pid (\d+)", "".join(lines))]

        os.killpg(pids["recommender"], signal.SIGKILL)  # the recommender dies ...
        match = read_until(proc, lines, r"started recommender \(pid (\d+)", timeout=30)  # ... and is back
        restarted = int(match.group(1))
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "restarted recommender never became healthy"
            time.sleep(0.5)

        proc.send_signal(signal.SIGTERM)
        read_until(proc, lines, r"\[stack\] stopped", timeout=60)
        assert proc.wait(timeout=30) == 0
        for pid in [*pids.values(), restarted, *kafka_redis]:
            assert not pid_alive(pid), f"process {pid} outlived the stack"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
