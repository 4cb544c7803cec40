"""Child processes that die with their parent: spawn, stop by PID, free ports, temp dirs.

Every local service (ingest.services) and every child of `make stack` (recommender.stack) is
started by `spawn_child`: in its own process group, so a Ctrl-C meant for us does not hit it
half-way and `stop_child` reaches whatever it forks, and with the parent-death signal
(prctl PR_SET_PDEATHSIG), so it is SIGKILLed when we die, even by SIGKILL: nothing is left behind
when a test fails or a stack is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local service could not be fetched, started or stopped."""


def free_port(host: str = HOST) -> int:
    """A port the OS says is free now. Racy by nature; a service's start() retries on a bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> None:
    """Runs in the child between fork and exec: die with the parent, even on its SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: atexit and stop_child() still apply
    # The parent may have died before prctl took effect; then nobody would ever stop us.
    if os.getppid() != parent_pid:
        os._exit(1)


_spawn_queue: queue.SimpleQueue | None = None
_spawn_lock = threading.Lock()


def _spawner() -> None:
    while True:
        args, kwargs, done = _spawn_queue.get()
        try:
            done.result = subprocess.Popen(*args, **kwargs)
        except BaseException as e:  # handed back to the caller's thread
            done.error = e
        done.set()


def _popen(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, from the main thread or from one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process: a child
    started from a short-lived thread (a supervisor's watch loop) would be killed with that
    thread. So forks from other threads go through a thread that lives as long as the process."""
    global _spawn_queue
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _spawn_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(target=_spawner, name="ternrec-spawner", daemon=True).start()
    done = threading.Event()
    done.result, done.error = None, None
    _spawn_queue.put((args, kwargs, done))
    done.wait()
    if done.error is not None:
        raise done.error
    return done.result


def spawn_child(argv: list[str], *, cwd: str | os.PathLike, env: dict[str, str], stdout) -> subprocess.Popen:
    """Starts `argv` in its own process group, dying with us; stdout and stderr go to `stdout`."""
    return _popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: killpg reaches its children too
        preexec_fn=functools.partial(_child_setup, os.getpid()),
        env=env,
    )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Sends `sig` to the child's process group (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_child(proc: subprocess.Popen, timeout: float, graceful: bool = True) -> None:
    """SIGTERM the child's process group, wait up to `timeout` s, then SIGKILL; reaps the child.

    Anything it left in its group (e.g. a Redis background save) is SIGKILLed at the end.
    `graceful=False` starts with SIGKILL. A caller stopping several children at once sends them
    all SIGTERM first (`signal_group`) and then calls this for each with what is left of its budget.
    """
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=timeout if graceful else 5.0)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
    signal_group(proc, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def make_temp_dir(name: str) -> Path:
    """A fresh temp data dir tagged with our PID; dirs left by dead owners (a SIGKILLed test
    run, which PDEATHSIG cleans of processes but not of files) are swept on the way."""
    prefix = f"ternrec-{name}-"
    for old in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            owner = int((old / ".owner").read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if not pid_alive(owner):
            shutil.rmtree(old, ignore_errors=True)
    d = Path(tempfile.mkdtemp(prefix=prefix))
    (d / ".owner").write_text(str(os.getpid()))
    return d
