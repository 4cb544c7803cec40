"""Real local services: a single-node Apache Kafka broker (KRaft) and a `redis-server`.

The one module that starts and stops real services. Everything binds to 127.0.0.1 on free ports
with temporary data dirs (unless told otherwise), waits until the service answers, and stops it by
PID: SIGTERM, then SIGKILL after a timeout. Children run in their own process group (so a Ctrl-C
meant for us does not hit them half-way) and die with us even if we are SIGKILLed
(prctl PR_SET_PDEATHSIG), so no process is left behind when a test fails or is killed.

    python -m ingest.services fetch-kafka   # Kafka broker jars from Maven Central (cached)
    python -m ingest.services up            # Kafka + Redis until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from urllib.parse import quote

from ingest.settings import KAFKA_VERSION, Settings

HOST = "127.0.0.1"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
STAMP_NAME = ".complete.json"


class ServiceError(RuntimeError):
    """A local service could not be fetched, started or stopped."""


# --------------------------------------------------------------------------- Kafka jars


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def kafka_libs(settings: Settings | None = None) -> Path:
    return (settings or Settings()).kafka_home / "libs"


def kafka_jars_ready(settings: Settings | None = None) -> bool:
    """True when a completed download for this Kafka version and this pom is in the cache."""
    home = (settings or Settings()).kafka_home
    try:
        stamp = json.loads((home / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    libs = home / "libs"
    jars = sorted(p.name for p in libs.glob("*.jar")) if libs.is_dir() else []
    return (
        stamp.get("kafka_version") == KAFKA_VERSION
        and stamp.get("pom_sha256") == _pom_digest()
        and stamp.get("jars") == jars
        and bool(jars)
    )


def fetch_kafka_jars(settings: Settings | None = None, *, quiet: bool = True) -> Path:
    """Copies the broker jars from Maven Central into `settings.kafka_home/libs`; returns that dir.

    Reused when the stamp file says a download for this version and pom completed. The jars go
    to a scratch dir first and the stamp is written last, so an interrupted download is redone.
    A file lock serialises concurrent callers (two pytest sessions, `make test` and `make stack`).
    """
    settings = settings or Settings()
    home = settings.kafka_home
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kafka_jars_ready(settings):
            return home / "libs"
        if shutil.which("mvn") is None:
            raise ServiceError("mvn not found: install Maven (make system-deps) to fetch the Kafka jars")
        (home / STAMP_NAME).unlink(missing_ok=True)
        scratch = home / f"libs.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [
            "mvn", "-B", *(["-q"] if quiet else []), "-f", str(POM),
            f"-Dkafka.version={KAFKA_VERSION}",
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={scratch}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            detail = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:] if quiet else ""
            raise ServiceError(f"mvn failed ({proc.returncode}) fetching Kafka {KAFKA_VERSION}:\n{detail}")
        jars = sorted(p.name for p in scratch.glob("*.jar"))
        if not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
            raise ServiceError(f"mvn finished but no kafka_2.13-{KAFKA_VERSION} jar in {scratch}")
        shutil.rmtree(home / "libs", ignore_errors=True)
        scratch.rename(home / "libs")
        stamp = {"kafka_version": KAFKA_VERSION, "pom_sha256": _pom_digest(), "jars": jars}
        (home / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
        return home / "libs"


# --------------------------------------------------------------------------- process plumbing


def free_port(host: str = HOST) -> int:
    """A port the OS says is free now. Racy by nature; start() retries on a bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
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
        pass  # not Linux: atexit and stop() still apply
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


def _spawn(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, from the main thread or from one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process: a service
    started from a short-lived thread would be killed with that thread. So forks from other
    threads go through a thread that lives as long as the process."""
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


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _make_temp_dir(name: str) -> Path:
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


_RUNNING: weakref.WeakSet[_Service] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # A normal interpreter exit with services still up (a fixture that never finalised, a script
    # that forgot stop()) must not leave them running; PDEATHSIG covers abnormal exits.
    for svc in list(_RUNNING):
        with contextlib.suppress(Exception):
            svc.stop(timeout=5.0)


class _Service:
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
            port = free_port()
            while port in taken:
                port = free_port()
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

    def start(self) -> _Service:
        with self._lock:
            if self.running:
                return self
            if self.data_dir is None:
                self.data_dir = _make_temp_dir(self.name)
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
                except _PortInUse as e:  # lost the free-port race: new ports, try again
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
        self.proc = _spawn(
            self._command(),
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches its children too
            preexec_fn=functools.partial(_child_setup, os.getpid()),
            env=self._env(),
        )

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if self._ports_are_ours and "Address already in use" in self._output_since_launch():
                    raise _PortInUse(tail[-300:])
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
            timeout = self.stop_timeout if timeout is None else timeout
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    proc.wait(timeout=timeout if graceful else 5.0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Anything the service forked (e.g. a Redis background save) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
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

    def restart(self, *, graceful: bool = True) -> _Service:
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
                os.killpg(self.proc.pid, signal.SIGKILL)


class _PortInUse(Exception):
    pass


# --------------------------------------------------------------------------- Kafka


def _cluster_id() -> str:
    # Kafka cluster ids are a UUID in URL-safe base64 without padding (what `random-uuid` prints).
    # One in 64 starts with "-": passed as `--cluster-id=...` so the tool never takes it for a flag.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


_LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
"""


DEFAULT_KAFKA_JVM_OPTS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20")


def _read_properties(path: Path) -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln and not ln.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


class LocalKafka(_Service):
    """A single-node Kafka broker in KRaft mode (broker + controller in one JVM) on 127.0.0.1.

    Storage is formatted on the first start in a data dir; a restart in the same dir keeps the
    topics and offsets. Settings suit tests: replication factor 1 everywhere, no initial rebalance
    delay, no auto-created topics (a typo in a topic name fails instead of creating a topic).
    """

    name = "kafka"
    _port_attrs = ("port", "controller_port")
    stop_timeout = 20.0  # a controlled shutdown normally takes 1-3 s

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        port: int = 0,
        controller_port: int = 0,
        data_dir: str | os.PathLike | None = None,
        partitions: int = 3,
        heap: str = "512m",
        startup_timeout: float = 90.0,
        extra_config: dict[str, str | int] | None = None,
        jvm_opts: list[str] | None = None,
    ) -> None:
        super().__init__(data_dir, startup_timeout)
        self.settings = settings or Settings()
        self.jvm_opts = list(DEFAULT_KAFKA_JVM_OPTS if jvm_opts is None else jvm_opts)
        self.port = port
        self.controller_port = controller_port
        self._fixed = frozenset(a for a, v in (("port", port), ("controller_port", controller_port)) if v)
        self.partitions = partitions
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self.cluster_id: str | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "kafka.out"

    def config(self) -> dict[str, str | int]:
        assert self.data_dir is not None
        cfg: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": self.partitions,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            # 50 offset partitions (the default) make the first consumer group wait for 50
            # partitions to load; 3 is plenty for one broker.
            "offsets.topic.num.partitions": 3,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 3,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "false",
            # Two cores shared with other work: fewer threads than the 8 I/O-thread default.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            # One voter, nobody to disagree with: elect it at once on a restart (default waits 1 s),
            # and let the broker heartbeat (register, catch up, unfence) at a faster pace.
            "controller.quorum.election.timeout.ms": 200,
            "broker.heartbeat.interval.ms": 500,
            # Compaction visible within seconds in tests (default would wait for a 1 GB segment).
            "log.cleaner.backoff.ms": 1000,
        }
        cfg.update(self.extra_config)
        return cfg

    def _prepare(self) -> None:
        libs = kafka_libs(self.settings)
        if not kafka_jars_ready(self.settings):
            fetch_kafka_jars(self.settings)
        props = self.data_dir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in self.config().items()))
        (self.data_dir / "log4j.properties").write_text(_LOG4J.format(log=self.data_dir / "server.log"))
        self._formatted_now = False
        meta = self.data_dir / "data" / "meta.properties"
        if meta.exists():  # formatted on an earlier start: keep the data
            self.cluster_id = _read_properties(meta)["cluster.id"]
            return
        self._formatted_now = True
        self.cluster_id = _cluster_id()
        cmd = [
            # C1 only: a short-lived tool gains nothing from C2 and starts ~2x faster without it.
            "java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", f"{libs}/*", *self._jvm_props(),
            "kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}", "-c", str(props),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.data_dir, timeout=120)
        if proc.returncode != 0:
            raise ServiceError(f"kafka storage format failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    _formatted_now = False

    def _before_port_retry(self) -> None:
        # The quorum state of a store formatted a moment ago names the old controller port:
        # format afresh rather than start a voter set that no longer exists.
        if self._formatted_now:
            shutil.rmtree(self.data_dir / "data", ignore_errors=True)
            self._formatted_now = False

    def _jvm_props(self) -> list[str]:
        return [
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-Djava.awt.headless=true",
        ]

    def _command(self) -> list[str]:
        return [
            "java", f"-Xmx{self.heap}", "-Xms128m", *self.jvm_opts,
            *self._jvm_props(), "-cp", f"{kafka_libs(self.settings)}/*",
            "kafka.Kafka", str(self.data_dir / "server.properties"),
        ]  # fmt: skip

    def log_tail(self, chars: int = 4000) -> str:
        out = super().log_tail(chars)
        try:
            server = (self.data_dir / "server.log").read_bytes()[-chars:].decode(errors="replace")
        except (OSError, TypeError):
            server = ""
        return (out + "\n" + server)[-chars:]

    def _log_files(self) -> list[Path]:
        return [self.log_path, self.data_dir / "server.log"]

    def _ready(self) -> bool:
        # Cheap check first: the JVM takes seconds to open its port, and a kafka-python client
        # against a closed port spends its whole timeout retrying.
        if not _port_open(HOST, self.port):
            return False
        return self._metadata_ok()

    def _metadata_ok(self) -> bool:
        """Ready = a metadata request answers and lists our broker (registered and unfenced)."""
        from kafka import KafkaAdminClient  # imported late: only Kafka users pay for it
        from kafka.errors import KafkaConfigurationError, KafkaError

        admin = None
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap, client_id="ternrec-ready",
                request_timeout_ms=3000, bootstrap_timeout_ms=3000,
            )  # fmt: skip
            cluster = admin.describe_cluster()
            # The cluster id tells our broker from another one that grabbed the port.
            return bool(cluster.get("brokers")) and cluster.get("cluster_id") == self.cluster_id
        except KafkaConfigurationError:
            raise  # our bug, not "not ready yet"
        except (KafkaError, OSError):
            return False
        finally:
            if admin is not None:
                with contextlib.suppress(Exception):
                    admin.close()


# --------------------------------------------------------------------------- Redis


class LocalRedis(_Service):
    """A `redis-server` on 127.0.0.1, optionally with a password, persisting to an append-only
    file so that `restart()` (same port, same data dir) keeps the data."""

    name = "redis"
    stop_timeout = 10.0

    def __init__(
        self,
        *,
        port: int = 0,
        password: str | None = None,
        data_dir: str | os.PathLike | None = None,
        appendfsync: str = "everysec",
        startup_timeout: float = 20.0,
        extra_config: dict[str, str | int] | None = None,
    ) -> None:
        super().__init__(data_dir, startup_timeout)
        self.port = port
        self._fixed = frozenset({"port"} if port else ())
        self.password = password
        self.appendfsync = appendfsync
        self.extra_config = dict(extra_config or {})

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def client(self, **kwargs):
        """A redis-py client for this server (the caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def _prepare(self) -> None:
        cfg: dict[str, str | int] = {
            "bind": HOST,
            "port": self.port,
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": str(self.data_dir),
            "logfile": '""',  # stdout, which goes to redis.out
            # Durability across restart(): AOF (flushed on SIGTERM) rather than RDB snapshots,
            # so even a SIGKILL loses at most `appendfsync` worth of writes.
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": '""',
        }
        if self.password:
            cfg["requirepass"] = self.password
        cfg.update(self.extra_config)
        # A config file, not argv: the password stays out of `ps`.
        conf = self.data_dir / "redis.conf"
        conf.write_text("".join(f"{k} {v}\n" for k, v in cfg.items()))
        conf.chmod(0o600)

    def _command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServiceError("redis-server not found: install it (make system-deps)")
        return [exe, str(self.data_dir / "redis.conf")]

    def _ready(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            # No client-side retries: this loop is the retry, and it must see each failure at once.
            with redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=1.0,
                             retry=Retry(NoBackoff(), 0)) as r:  # fmt: skip
                r.ping()  # raises BusyLoadingError while the AOF is replayed
                # Someone else may own the port (our server then exits on the bind error):
                # only our own process counts as ready.
                return int(r.info("server")["process_id"]) == self.pid
        except redis.RedisError:
            return False


# --------------------------------------------------------------------------- CLI


def _cmd_fetch(args: argparse.Namespace) -> int:
    settings = Settings()
    cached = kafka_jars_ready(settings)
    t0 = time.perf_counter()
    libs = fetch_kafka_jars(settings, quiet=not args.verbose)
    n = len(list(libs.glob("*.jar")))
    how = "cached" if cached else f"fetched in {time.perf_counter() - t0:.1f}s"
    print(f"Kafka {KAFKA_VERSION} broker jars ({n}, {how}): {libs}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    started = False

    def on_signal(*_) -> None:
        stop.set()
        if not started:  # still starting: abort the wait; `finally` stops what is up
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    kafka = LocalKafka(port=args.kafka_port, data_dir=args.kafka_dir, partitions=args.partitions)
    redis_srv = LocalRedis(port=args.redis_port, password=args.redis_password, data_dir=args.redis_dir)
    try:
        redis_srv.start()
        print(f"redis  {redis_srv.url if args.show_password else _redact(redis_srv)}  "
              f"pid {redis_srv.pid}  started in {redis_srv.startup_seconds:.2f}s", flush=True)  # fmt: skip
        kafka.start()
        print(f"kafka  {kafka.bootstrap}  pid {kafka.pid}  started in {kafka.startup_seconds:.2f}s",
              flush=True)  # fmt: skip
        print(f"export TERNREC_KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
        print(f"export TERNREC_REDIS_URL={redis_srv.url if args.show_password else _redact(redis_srv)}",
              flush=True)  # fmt: skip
        print("Ctrl-C to stop", flush=True)
        started = True
        while not stop.wait(0.5):
            for svc in (kafka, redis_srv):
                if not svc.running:
                    print(f"{svc.name} died:\n{svc.log_tail(2000)}", file=sys.stderr)
                    return 1
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        t0 = time.perf_counter()
        kafka.stop()
        redis_srv.stop()
        print(f"stopped in {time.perf_counter() - t0:.2f}s", flush=True)


def _redact(r: LocalRedis) -> str:
    return r.url.replace(quote(r.password, safe=""), "***") if r.password else r.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.services", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fetch-kafka", help="fetch the Kafka broker jars (reused when cached)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Maven's output")
    p.set_defaults(func=_cmd_fetch)
    p = sub.add_parser("up", help="start Kafka + Redis on 127.0.0.1 until Ctrl-C/SIGTERM")
    p.add_argument("--kafka-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-port", type=int, default=0, help="default: a free port")
    p.add_argument("--redis-password", default=os.environ.get("TERNREC_REDIS_PASSWORD") or None,
                   help="require this password (default: $TERNREC_REDIS_PASSWORD, else none)")  # fmt: skip
    p.add_argument("--show-password", action="store_true", help="print the Redis URL unredacted")
    p.add_argument("--kafka-dir", help="persistent Kafka data dir (default: a temporary one)")
    p.add_argument("--redis-dir", help="persistent Redis data dir (default: a temporary one)")
    p.add_argument("--partitions", type=int, default=Settings().partitions, help="broker num.partitions")
    p.set_defaults(func=_cmd_up)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
