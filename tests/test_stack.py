"""`make stack` end to end: real services come up, a dead service is restarted, SIGTERM stops every
process the stack started, and a SIGKILLed stack leaves none of them running."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ingest.services import free_port, pid_alive
from ingest.settings import REPO_ROOT
from tests.processes import kill_survivors, snapshot_tree, survivors

pytestmark = pytest.mark.integration


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


def start_stack(*flags: str) -> tuple[subprocess.Popen, int]:
    http_port = free_port()
    env = {**os.environ, "TERNREC_HTTP_PORT": str(http_port), "TERNREC_UI_PORT": str(free_port()),
           "TERNREC_ENCODER": "hashing:384", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recommender.stack", *flags], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, http_port


def test_stack_serves_restarts_and_stops_cleanly(kafka):  # `kafka` makes sure the jars are fetched
    proc, http_port = start_stack("--no-ui", "--users", "20")
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

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        read_until(proc, lines, r"\[stack\] stopped", timeout=60)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 10, "the stack took 10 s or more to stop"
        for pid in [*pids.values(), restarted, *kafka_redis]:
            assert not pid_alive(pid), f"process {pid} outlived the stack"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_sigkilled_stack_leaves_no_process_behind(kafka):  # `kafka` makes sure the jars are fetched
    """Every child (broker, redis-server, worker, recommender, UI) dies with the stack, by PID."""
    proc, _ = start_stack("--no-replay")
    lines: list[str] = []
    tree: dict[int, int] = {}
    try:
        read_until(proc, lines, r"\[stack\] ready", timeout=180)
        started = {m.group(1): int(m.group(2)) for m in re.finditer(r"started (\S+) \(pid (\d+)", "".join(lines))}
        assert {"worker-1", "recommender", "ui"} <= started.keys()
        tree = snapshot_tree(proc.pid)
        kafka_redis = [int(p) for p in re.findall(r"\(pid (\d+)\) and Redis .* \(pid (\d+)\)", "".join(lines))[0]]
        assert {*started.values(), *kafka_redis} <= tree.keys()  # the children the stack named, alive

        proc.kill()  # SIGKILL to the stack alone: no handler runs, nothing is stopped in order
        proc.wait()
        deadline = time.monotonic() + 5
        while survivors(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not survivors(tree), f"outlived the SIGKILLed stack: {survivors(tree)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_survivors(tree)  # never leave a broker running for the rest of the session
