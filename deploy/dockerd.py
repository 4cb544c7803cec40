"""A private Docker engine for the compose check: its own containerd and dockerd, stopped by PID.

Nothing is shared with a system Docker, if one runs: own sockets, exec-root, pidfile and config
files in a fresh run directory (never /etc/docker/daemon.json, never /run/containerd), own
containerd namespace, and a data root under ~/.cache/ternrec/docker so image layers are reused
between runs (a file lock keeps two checks off the same data root). No bridge, no iptables rules:
containers use the host network of the network namespace the check runs in. Both daemons get
PR_SET_PDEATHSIG, so a SIGKILLed check does not leave them running.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DATA_ROOT = Path.home() / ".cache" / "ternrec" / "docker"
NAMESPACE = "ternrec-check"
# Debian's docker.io client matches its dockerd; any other docker CLI on PATH is the fallback.
DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """The private engine could not start, or a docker command failed."""


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the check dies, even by SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stop_pid(proc: subprocess.Popen, timeout: float) -> str:
    """SIGTERM, then SIGKILL after `timeout`; says which one it took."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    proc.terminate()
    try:
        proc.wait(timeout)
        return "stopped"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"killed after {timeout:.0f} s"


class PrivateDocker:
    """`with PrivateDocker() as engine: engine.docker("ps")`; `engine.env` for docker-compose."""

    def __init__(self, data_root: Path = DATA_ROOT, log_dir: Path | None = None, log=print):
        self.data_root = data_root
        self.log = log
        # A short path: the containerd socket lives below it (unix socket paths stop at 107 bytes).
        self.run_dir = Path(tempfile.mkdtemp(prefix="ternrec-docker-"))
        self.log_dir = log_dir or self.run_dir
        self.socket = self.run_dir / "docker.sock"
        self.containerd_socket = self.run_dir / "containerd.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0",
                    "COMPOSE_DOCKER_CLI_BUILD": "0"}
        self.env.pop("DOCKER_CONTEXT", None)
        self._lock = None
        self._procs: list[tuple[str, subprocess.Popen, float]] = []

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> PrivateDocker:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_root.with_name("docker.lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log(f"another compose check holds {self.data_root}; waiting for it to finish")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        containerd_conf = self.run_dir / "containerd.toml"
        containerd_conf.write_text(
            "version = 2\n"
            f'root = "{self.run_dir / "containerd-root"}"\n'
            f'state = "{self.run_dir / "containerd-state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.containerd_socket}"\n'
        )
        self._spawn("containerd", ["containerd", "--config", str(containerd_conf)], stop_timeout=20)
        self._wait(lambda: self.containerd_socket.exists(), "containerd", 30)
        (self.run_dir / "daemon.json").write_text("{}\n")
        self._spawn("dockerd", [
            "dockerd", "--config-file", str(self.run_dir / "daemon.json"),
            "--host", f"unix://{self.socket}", "--pidfile", str(self.run_dir / "docker.pid"),
            "--exec-root", str(self.run_dir / "exec"), "--data-root", str(self.data_root),
            "--containerd", str(self.containerd_socket), "--containerd-namespace", NAMESPACE,
            "--containerd-plugins-namespace", f"{NAMESPACE}-plugins", "--storage-driver", "overlay2",
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
            "--ip-masq=false", "--userland-proxy=false",
        ], stop_timeout=60)  # fmt: skip
        self._wait(lambda: self.docker("version", check=False).returncode == 0, "dockerd", 60)
        return self

    def stop(self) -> None:
        """dockerd first (it stops its containers), then containerd; then any shim left over."""
        for name, proc, timeout in reversed(self._procs):
            outcome = _stop_pid(proc, timeout)
            if outcome != "stopped":
                self.log(f"{name} (pid {proc.pid}): {outcome}")
        self._procs.clear()
        for pid in self._leftover_pids():
            self.log(f"killing pid {pid} left over by the private engine: {_cmdline(pid)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # dockerd leaves its network namespace bind-mounted in the exec-root: ours to unmount.
        for mount in sorted(self._mounts(), reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        if self._mounts():
            self.log(f"mounts still under {self.run_dir}, leaving it in place: {self._mounts()}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> PrivateDocker:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- commands ---------------------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True, timeout: float | None = 300,
               stdin=None) -> subprocess.CompletedProcess:
        """A docker CLI call against this engine, output captured."""
        proc = subprocess.run([DOCKER_CLI, *args], env=self.env, capture_output=True, text=stdin is None,
                              timeout=timeout, stdin=stdin)
        if check and proc.returncode != 0:
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            raise EngineError(f"docker {' '.join(args[:3])} failed ({proc.returncode}): {err.strip()[-2000:]}")
        return proc

    def image_exists(self, image: str) -> bool:
        return self.docker("image", "inspect", image, check=False).returncode == 0

    def image_size(self, image: str) -> int:
        return int(self.docker("image", "inspect", "-f", "{{.Size}}", image).stdout)

    # -- plumbing ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], stop_timeout: float) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True,  # a Ctrl-C reaches the check, which stops us
                                    preexec_fn=_die_with_parent)
        self._procs.append((name, proc, stop_timeout))

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self._procs[-1][1]
        while not ready():
            if proc.poll() is not None:
                raise EngineError(f"{name} exited ({proc.returncode}) at start-up: {self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise EngineError(f"{name} not ready after {timeout:.0f} s: {self._log_tail(name)}")
            time.sleep(0.2)

    def _log_tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else f"(no {path})"

    def _mounts(self) -> list[str]:
        points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        return [p for p in points if p.startswith(f"{self.run_dir}/")]

    def _leftover_pids(self) -> list[int]:
        needle = str(self.run_dir).encode()
        return [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and int(p.name) != os.getpid() and needle in _cmdline_bytes(p)]


def _cmdline_bytes(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> str:
    return _cmdline_bytes(Path(f"/proc/{pid}")).replace(b"\0", b" ").decode(errors="replace")
