"""`LocalService`: one child process with a start/stop life cycle, the base of LocalKafka and LocalRedis.

Binds to 127.0.0.1 on free ports (re-picked when another process wins the race for one) with a
temporary data dir unless told otherwise, waits until the service answers, and stops it by PID:
SIGTERM, then SIGKILL after a timeout. The process itself is started by
`ingest.services.process.spawn_child`, so it dies with us even if we are SIGKILLed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

from ingest.services import process
from ingest.services.process import ServiceError, make_temp_dir, signal_group, spawn_child, stop_child

_RUNNING: weakref.WeakSet[LocalService] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # A normal interpreter exit with services still up (a fixture that never finalised, a script
    # that forgot stop()) must not leave them running; PDEATHSIG covers abnormal exits.
    for svc in list(_RUNNING):
        with contextlib.suppress(Exception):
            svc.stop(timeout=5.0)


class LocalService:
    """A child process with a start/stop life cycle; subclasses say how to launch and probe it."""

    name = "service"
    stop_timeout = 10.0

    def __init__(self, data_dir: str | os.PathLike | None, startup_timeout: float) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self.data_dir: Path | None = self._given_dir
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self._log_file = None
        self._lock = threading.Lock()

    # -- to implement
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Writes config files / formats storage in self.data_dir before launch."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def _before_port_retry(self) -> None:
        """Undoes what the failed attempt wrote that depends on the old ports."""

    _port_attrs: tuple[str, ...] = ("port",)

    def _pick_ports(self, first: bool) -> None:
        """Fills unset ports; on a retry after losing the free-port race, re-picks ours."""
        if self._restarting:
            return  # restart() keeps the ports by contract
        taken: set[int] = set()
        for attr in self._port_attrs:
            if attr in self._fixed or (first and getattr(self, attr)):
                taken.add(getattr(self, attr))
                continue
            port = process.free_port()
            while port in taken:
                port = process.free_port()
            setattr(self, attr, port)
            taken.add(port)

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / f"{self.name}.out"

    # -- life cycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> LocalService:
        with self._lock:
            if self.running:
                return self
            if self.data_dir is None:
                self.data_dir = make_temp_dir(self.name)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            last_error: Exception | None = None
            for attempt in range(3):
                self._pick_ports(first=attempt == 0)
                try:
                    t_prepare = time.perf_counter()
                    self._prepare()
                    t_launch = time.perf_counter()
                    self._launch()
                    self._wait_ready()
                    # Where start-up time goes: config/format vs process start until ready.
                    self.timings = {"prepare_s": t_launch - t_prepare,
                                    "launch_to_ready_s": time.perf_counter() - t_launch}
                    break
                except PortInUse as e:  # lost the free-port race: new ports, try again
                    last_error = e
                    self._kill()
                    self._before_port_retry()
                except BaseException:
                    self._kill()
                    raise
            else:
                raise ServiceError(f"{self.name}: could not bind a free port: {last_error}")
            self.startup_seconds = time.perf_counter() - t0
            _RUNNING.add(self)
            return self

    _log_offsets: dict[Path, int] = {}

    def _launch(self) -> None:
        self._log_offsets = {p: p.stat().st_size if p.exists() else 0 for p in self._log_files()}
        self._log_file = open(self.log_path, "ab")
        self.proc = spawn_child(self._command(), cwd=self.data_dir, env=self._env(), stdout=self._log_file)

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if self._ports_are_ours and "Address already in use" in self._output_since_launch():
                    raise PortInUse(tail[-300:])
                raise ServiceError(f"{self.name} exited with {self.proc.returncode} during start-up:\n{tail}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _log_files(self) -> list[Path]:
        return [self.log_path]

    def _output_since_launch(self) -> str:
        """What this launch wrote (the logs also hold earlier starts of the same data dir)."""
        out = []
        for path in self._log_files():
            try:
                with open(path, "rb") as f:
                    f.seek(self._log_offsets.get(path, 0))
                    out.append(f.read().decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def _kill(self, timeout: float | None = None, graceful: bool = True) -> None:
        """SIGTERM the process group, wait, then SIGKILL; reaps the child."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, self.stop_timeout if timeout is None else timeout, graceful)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float | None = None, *, keep_data: bool = False) -> None:
        """Stops the service (SIGTERM, SIGKILL after `timeout` s). A data dir we created is
        removed unless keep_data; a data dir the caller gave is always kept."""
        with self._lock:
            t0 = time.perf_counter()
            was_running = self.running
            self._kill(timeout)
            if was_running:
                self.stop_seconds = time.perf_counter() - t0
            _RUNNING.discard(self)
            if self._given_dir is None and self.data_dir is not None and not keep_data:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir = None

    def kill(self) -> None:
        """SIGKILL, no graceful shutdown (crash tests); the data dir is kept for a restart."""
        with self._lock:
            self._kill(graceful=False)

    def restart(self, *, graceful: bool = True) -> LocalService:
        """Stops and starts again on the same port(s) and data dir (the data survive)."""
        with self._lock:
            self._kill(graceful=graceful)
            self._restarting = True
        try:
            return self.start()
        finally:
            self._restarting = False

    _restarting = False

    @property
    def _ports_are_ours(self) -> bool:
        """True when we picked the ports (so retrying with other ports is allowed)."""
        return not self._restarting and len(self._fixed) < len(self._port_attrs)

    _fixed: frozenset[str] = frozenset()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort for a forgotten instance; never raises during interpreter teardown.
        with contextlib.suppress(Exception):
            if self.proc is not None and self.proc.poll() is None:
                signal_group(self.proc, signal.SIGKILL)


class PortInUse(Exception):
    """The service lost the race for a port we picked: start() picks new ones."""
