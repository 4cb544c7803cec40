"""`make stack`: real Kafka + real Redis + worker + recommender + UI on 127.0.0.1, no Docker.

Starts a single-node KRaft broker and a password-protected redis-server (ingest.services), then
the services as child processes with their settings in the environment, like compose would:
the encoder worker, the recommender (TERNREC_HTTP_PORT), the Streamlit UI (TERNREC_UI_PORT) and a
one-shot replay of the catalog. A long-running service that dies is restarted (with back-off, as
compose's `restart: on-failure`); the replay job is restarted only when it fails, and resumes where
it stopped. Prints the URLs once the recommender answers. SIGINT/SIGTERM stops everything it started
within 10 s, at any moment (start-up included); every child is started by ingest.services.process,
so it dies with the stack even when the stack itself is SIGKILLed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ingest.services import LocalKafka, LocalRedis, fetch_kafka_jars, kafka_jars_ready
from ingest.services.process import signal_group, spawn_child, stop_child
from ingest.settings import REPO_ROOT, Settings
from recommender.stopping import StopRequested, abort_on_signal

# SIGTERM to exit within 10 s: the services get SERVICES_STOP_S (then SIGKILL), then Kafka and
# Redis, stopped side by side, BROKERS_STOP_S (their data dirs are temporary: nothing to save).
SERVICES_STOP_S = 5.0
BROKERS_STOP_S = 3.0


@dataclass
class Service:
    name: str
    argv: list[str]
    long_running: bool = True  # restart whenever it exits; else only when it fails
    proc: subprocess.Popen | None = None
    restarts: int = 0
    done: bool = False
    next_start: float = 0.0
    log: Path = field(default_factory=Path)


class Supervisor:
    """Starts, restarts and stops the services; each child dies with the stack, even on SIGKILL."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.services: list[Service] = []
        self.stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def add(self, service: Service) -> None:
        service.log = self.log_dir / f"{service.name}.log"
        self.services.append(service)
        self._start(service)

    def _start(self, service: Service) -> None:
        with open(service.log, "ab") as out:
            service.proc = spawn_child(service.argv, cwd=REPO_ROOT, env=self.env, stdout=out)
        print(f"[stack] started {service.name} (pid {service.proc.pid}, log {service.log})", flush=True)

    def start_watching(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Restarts services that died, until stop() is called."""
        while not self.stopping.wait(0.5):
            for service in self.services:
                if service.done or service.proc is None or service.proc.poll() is None:
                    continue
                code = service.proc.returncode
                if not service.long_running and code == 0:
                    service.done = True
                    print(f"[stack] {service.name} finished", flush=True)
                    continue
                now = time.monotonic()
                if service.next_start == 0.0:
                    delay = min(30.0, 2.0 ** min(service.restarts, 5))
                    service.next_start = now + delay
                    print(f"[stack] {service.name} exited with {code}; restarting in {delay:.0f} s "
                          f"(see {service.log})", flush=True)
                elif now >= service.next_start:
                    service.restarts += 1
                    service.next_start = 0.0
                    self._start(service)

    def stop(self, timeout: float = SERVICES_STOP_S) -> None:
        """SIGTERM to every service at once; whatever still runs after `timeout` s is SIGKILLed."""
        self.stopping.set()
        if self._watcher is not None:
            self._watcher.join()  # no restart can race with the stop
        procs = [s.proc for s in self.services if s.proc is not None]
        for proc in procs:
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            stop_child(proc, max(0.1, deadline - time.monotonic()))


def wait_healthy(url: str, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class Stack:
    """What `make stack` runs; `stop()` stops whatever `start()` got to, even half-way."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args = args
        self.settings = settings
        self.kafka: LocalKafka | None = None
        self.redis: LocalRedis | None = None
        self.supervisor: Supervisor | None = None

    def start(self) -> None:
        """Kafka, Redis, then the services; returns once the recommender answers (or after 300 s)."""
        args, settings = self.args, self.settings
        if not kafka_jars_ready(settings):
            fetch_kafka_jars(settings, quiet=False)
        began = time.perf_counter()
        self.kafka = kafka = LocalKafka(settings, partitions=settings.partitions)
        kafka.start()
        self.redis = redis_server = LocalRedis(password=secrets.token_urlsafe(16))
        redis_server.start()
        print(f"[stack] Kafka {kafka.bootstrap} (pid {kafka.pid}) and Redis 127.0.0.1:{redis_server.port} "
              f"(pid {redis_server.pid}) up in {time.perf_counter() - began:.1f} s", flush=True)
        env = {**os.environ, "TERNREC_KAFKA_BOOTSTRAP": kafka.bootstrap, "TERNREC_REDIS_URL": redis_server.url,
               "TERNREC_HTTP_PORT": str(settings.http_port), "TERNREC_UI_PORT": str(settings.ui_port),
               "TERNREC_SERVICE_URL": settings.resolved_service_url, "HF_HUB_OFFLINE": "1"}
        log_dir = kafka.data_dir / "stack-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = supervisor = Supervisor(env, log_dir)
        python = sys.executable
        ui_app = REPO_ROOT / "ui" / "app.py"
        for n in range(args.workers):
            supervisor.add(Service(f"worker-{n + 1}", [python, "-m", "recommender.worker"]))
        supervisor.add(Service("recommender", [python, "-m", "recommender.service"]))
        if not args.no_ui and ui_app.is_file():
            supervisor.add(Service("ui", [python, "-m", "streamlit", "run", str(ui_app),
                                          "--server.port", str(settings.ui_port), "--server.address",
                                          settings.http_host, "--server.headless", "true",
                                          "--browser.gatherUsageStats", "false"]))
        if not args.no_replay:
            supervisor.add(Service("replay", [python, "-m", "ingest.replay", "--no-progress", "--interleave",
                                              "--users", str(args.users),
                                              "--state", str(kafka.data_dir / "replay-state.json")],
                                   long_running=False))
        supervisor.start_watching()
        if wait_healthy(settings.resolved_service_url):
            print(f"[stack] ready in {time.perf_counter() - began:.1f} s", flush=True)
            print(f"[stack] recommender API: {settings.resolved_service_url}", flush=True)
            if any(s.name == "ui" for s in supervisor.services):
                print(f"[stack] UI:              http://{settings.http_host}:{settings.ui_port}", flush=True)
            print(f"[stack] Kafka: {kafka.bootstrap}   Redis: {redis_server.url.split('@')[-1]}   "
                  f"logs: {log_dir}   Ctrl-C stops everything", flush=True)

    def stop(self) -> None:
        """The services first (they commit to Kafka on the way out), then Kafka and Redis side by side."""
        if self.supervisor is not None:
            self.supervisor.stop()
        threads = [threading.Thread(target=s.stop, kwargs={"timeout": BROKERS_STOP_S})
                   for s in (self.kafka, self.redis) if s is not None]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ui", action="store_true", help="do not start the Streamlit UI")
    parser.add_argument("--no-replay", action="store_true", help="do not replay the catalog")
    parser.add_argument("--workers", type=int, default=1, help="encoder worker processes")
    parser.add_argument("--users", type=int, default=2000, help="replay the interactions of N users")
    stack = Stack(parser.parse_args(argv), Settings())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with abort_on_signal():  # a signal while starting aborts the wait; `finally` stops what is up
            stack.start()
        while not stop.wait(1):
            pass
    except StopRequested:
        pass
    finally:
        print("[stack] stopping ...", flush=True)
        stack.stop()
        print("[stack] stopped", flush=True)


if __name__ == "__main__":
    main()
