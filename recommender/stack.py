"""`make stack`: real Kafka + real Redis + worker + recommender + UI on 127.0.0.1, no Docker.

Starts a single-node KRaft broker and a password-protected redis-server (ingest.services), then
the services as child processes with their settings in the environment, like compose would:
the encoder worker, the recommender (TERNREC_HTTP_PORT), the Streamlit UI (TERNREC_UI_PORT) and a
one-shot replay of the catalog. A long-running service that dies is restarted (with back-off, as
compose's `restart: on-failure`); the replay job is restarted only when it fails, and resumes where
it stopped. Prints the URLs once the recommender answers; SIGINT/SIGTERM stops everything it started.
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
from ingest.settings import Settings

REPO = Path(__file__).resolve().parent.parent


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
    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.services: list[Service] = []
        self.stopping = threading.Event()

    def add(self, service: Service) -> None:
        service.log = self.log_dir / f"{service.name}.log"
        self.services.append(service)
        self._start(service)

    def _start(self, service: Service) -> None:
        out = open(service.log, "ab")
        service.proc = subprocess.Popen(service.argv, cwd=REPO, env=self.env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        print(f"[stack] started {service.name} (pid {service.proc.pid}, log {service.log})", flush=True)

    def watch(self) -> None:
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

    def stop(self) -> None:
        self.stopping.set()
        for service in self.services:
            if service.proc and service.proc.poll() is None:
                os.killpg(service.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for service in self.services:
            if service.proc is None:
                continue
            try:
                service.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(service.proc.pid, signal.SIGKILL)
                service.proc.wait()


def wait_healthy(url: str, supervisor: Supervisor, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not supervisor.stopping.is_set():
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ui", action="store_true", help="do not start the Streamlit UI")
    parser.add_argument("--no-replay", action="store_true", help="do not replay the catalog")
    parser.add_argument("--workers", type=int, default=1, help="encoder worker processes")
    parser.add_argument("--users", type=int, default=2000, help="replay the interactions of N users")
    args = parser.parse_args(argv)
    settings = Settings()
    if not kafka_jars_ready(settings):
        fetch_kafka_jars(settings, quiet=False)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    began = time.perf_counter()
    kafka = LocalKafka(settings, partitions=settings.partitions).start()
    redis_server = LocalRedis(password=secrets.token_urlsafe(16)).start()
    print(f"[stack] Kafka {kafka.bootstrap} (pid {kafka.pid}) and Redis 127.0.0.1:{redis_server.port} "
          f"(pid {redis_server.pid}) up in {time.perf_counter() - began:.1f} s", flush=True)
    env = {**os.environ, "TERNREC_KAFKA_BOOTSTRAP": kafka.bootstrap, "TERNREC_REDIS_URL": redis_server.url,
           "TERNREC_HTTP_PORT": str(settings.http_port), "TERNREC_UI_PORT": str(settings.ui_port),
           "TERNREC_SERVICE_URL": settings.resolved_service_url, "HF_HUB_OFFLINE": "1"}
    log_dir = kafka.data_dir / "stack-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(env, log_dir)
    python = sys.executable
    try:
        for n in range(args.workers):
            supervisor.add(Service(f"worker-{n + 1}", [python, "-m", "recommender.worker"]))
        supervisor.add(Service("recommender", [python, "-m", "recommender.service"]))
        if not args.no_ui and (REPO / "ui" / "app.py").is_file():
            supervisor.add(Service("ui", [python, "-m", "streamlit", "run", str(REPO / "ui" / "app.py"),
                                          "--server.port", str(settings.ui_port), "--server.address",
                                          settings.http_host, "--server.headless", "true",
                                          "--browser.gatherUsageStats", "false"]))
        if not args.no_replay:
            supervisor.add(Service("replay", [python, "-m", "ingest.replay", "--no-progress", "--interleave",
                                              "--users", str(args.users),
                                              "--state", str(kafka.data_dir / "replay-state.json")],
                                   long_running=False))
        threading.Thread(target=supervisor.watch, name="supervisor", daemon=True).start()
        if wait_healthy(settings.resolved_service_url, supervisor):
            print(f"[stack] ready in {time.perf_counter() - began:.1f} s", flush=True)
            print(f"[stack] recommender API: {settings.resolved_service_url}", flush=True)
            if any(s.name == "ui" for s in supervisor.services):
                print(f"[stack] UI:              http://{settings.http_host}:{settings.ui_port}", flush=True)
            print(f"[stack] Kafka: {kafka.bootstrap}   Redis: {redis_server.url.split('@')[-1]}   "
                  f"logs: {log_dir}   Ctrl-C stops everything", flush=True)
        while not stop.wait(1):
            pass
    finally:
        print("[stack] stopping ...", flush=True)
        supervisor.stop()
        redis_server.stop()
        kafka.stop()
        print("[stack] stopped", flush=True)


if __name__ == "__main__":
    main()
