"""Process helpers shared by the tests that start services as real processes and kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ingest.services.process import process_tree, spawn_child
from ingest.settings import REPO_ROOT, Settings


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the PID, a process's identity
    (a PID alone may be reused). None when the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def snapshot_tree(pid: int) -> dict[int, int]:
    """{pid: start time} of `pid` and everything below it, right now."""
    return {p: t for p in process_tree(pid) if (t := start_time(p)) is not None}


def survivors(tree: dict[int, int]) -> dict[int, str]:
    """The processes of a snapshot still running (same PID, same start time), with their command line."""
    out = {}
    for pid, started in tree.items():
        if start_time(pid) == started:
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return out


def kill_survivors(tree: dict[int, int]) -> None:
    for pid in survivors(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def settings_env(settings: Settings, encoder: str, **extra: str) -> dict[str, str]:
    """The environment a service process gets: this test's connections and topics."""
    env = {**os.environ, "TERNREC_ENCODER": encoder, "HF_HUB_OFFLINE": "1", **extra}
    for name in ("kafka_bootstrap", "redis_url", "max_wait_ms", "topic_item_events", "topic_user_events",
                 "topic_item_embeddings", "topic_dead_letter"):
        env[f"TERNREC_{name.upper()}"] = str(getattr(settings, name))
    return env


def start_module(module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m module` as a child that dies with the test run."""
    with open(log, "ab") as out:
        return spawn_child([sys.executable, "-m", module], cwd=REPO_ROOT, env=env, stdout=out)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def exit_seconds(procs: list[subprocess.Popen], timeout: float) -> list[float | None]:
    """Seconds until each process exited (they were signalled just before), None if still running
    after `timeout`."""
    began = time.monotonic()
    took: list[float | None] = [None] * len(procs)
    while time.monotonic() - began < timeout and None in took:
        for n, proc in enumerate(procs):
            if took[n] is None and proc.poll() is not None:
                took[n] = time.monotonic() - began
        time.sleep(0.05)
    return took
