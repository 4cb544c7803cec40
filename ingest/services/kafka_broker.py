"""A real Apache Kafka broker on 127.0.0.1: the broker jars from Maven Central, and `LocalKafka`.

`fetch_kafka_jars` copies the jars of the pinned Kafka version (ingest/kafka/pom.xml) into a cache
outside the repository, once; `LocalKafka` runs a single-node KRaft broker from them.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from ingest.services.lifecycle import LocalService
from ingest.services.process import HOST, ServiceError, port_open
from ingest.settings import KAFKA_VERSION, Settings

POM = Path(__file__).resolve().parent.parent / "kafka" / "pom.xml"
STAMP_NAME = ".complete.json"


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


class LocalKafka(LocalService):
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
        if not port_open(HOST, self.port):
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
