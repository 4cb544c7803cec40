"""`make compose-check`: docker-compose.yml built and run for real on this machine, end to end.

    python -m deploy.compose_check        # what `make compose-check` runs after installing Docker

Set-up first (it may download; everything is cached under ~/.cache/ternrec): Debian root
filesystems by debootstrap (deploy/base_images.py) and the wheelhouse of the app image
(deploy/wheelhouse.py); the Makefile installs docker.io and docker-compose and fetches the Kafka
jars. Then the check proper runs in a new network namespace that has nothing but loopback
(`unshare --net`), so nothing it starts can reach another address, against a private Docker
engine (deploy/dockerd.py) that is stopped at the end, also on failure or Ctrl-C. The steps are
listed in STEPS below; each one's figures go into the summary; any failure exits 1.
Logs of the last run (engine, compose, every container) are kept in ~/.cache/ternrec/compose-check.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from deploy.base_images import prepare_rootfs, resolve_base_images
from deploy.dockerd import PrivateDocker
from deploy.probes import (
    CheckFailed,
    EventRecorder,
    GroupProbe,
    SharingTracker,
    listening_addresses,
    verify_start_order,
    wait_for,
)
from deploy.wheelhouse import prepare_wheelhouse, serve, wheelhouse_dir
from ingest.eventlog import worker_group
from ingest.settings import REPO_ROOT

PROJECT = "ternrec-check"
FILES = (REPO_ROOT / "docker-compose.yml", REPO_ROOT / "deploy" / "compose.check.yml")
LOG_DIR = Path.home() / ".cache" / "ternrec" / "compose-check"
MERGED = LOG_DIR / "compose.merged.yml"
NEW_ITEMS = 2000  # posted during the worker-kill step


def log(message: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Stack:
    """The compose project of the check and the steps run against it."""

    def __init__(self, engine: PrivateDocker, wheelhouse_url: str):
        self.engine = engine
        kafka, controller, redis, http, ui = _free_ports(5)
        example = dict(line.split("=", 1) for line in (REPO_ROOT / ".env.example").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))
        self.api_key = secrets.token_urlsafe(24)
        self.variables = {**example, "REDIS_PASSWORD": secrets.token_hex(16), "TERNREC_API_KEY": self.api_key,
                          "TERNREC_HTTP_PORT": str(http), "TERNREC_UI_PORT": str(ui),
                          "CHECK_KAFKA_PORT": str(kafka), "CHECK_KAFKA_CONTROLLER_PORT": str(controller),
                          "CHECK_REDIS_PORT": str(redis), "CHECK_WHEELHOUSE_URL": wheelhouse_url}
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=10)
        self.ui_url = f"http://127.0.0.1:{ui}"
        self.bootstrap = f"127.0.0.1:{kafka}"
        self.events = EventRecorder(engine, PROJECT)
        self.figures: dict[str, str] = {}
        self.catalog_size = 0
        self.files = FILES

    def merge_files(self) -> None:
        """The production file with the check's override, as one file without published ports.

        Compose v1 cannot drop a key in an override, and docker refuses published ports on the
        host network: so the merged config (`docker-compose config`) loses them, and is used from
        here on."""
        config = yaml.safe_load(self.compose("config"))
        for service in config["services"].values():
            if service.get("network_mode") == "host":
                service.pop("ports", None)
        MERGED.write_text(yaml.safe_dump(config, sort_keys=False))
        MERGED.chmod(0o600)  # it holds this run's Redis password
        self.files = (MERGED,)

    # -- plumbing ---------------------------------------------------------------------------------
    def compose(self, *args: str, files=None, variables=None, timeout: float = 900) -> str:
        env_file = LOG_DIR / "check.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in (variables or self.variables).items()))
        # Only the engine's address from our environment: the rest comes from the env file.
        env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "DOCKER_HOST": self.engine.env["DOCKER_HOST"]}
        cmd = ["docker-compose", "-p", PROJECT, "--env-file", str(env_file)]
        for f in files or self.files:
            cmd += ["-f", str(f)]
        with open(LOG_DIR / "compose.log", "a") as out:
            out.write(f"\n$ {' '.join(cmd[5:])} {' '.join(args)}\n")
            out.flush()
            proc = subprocess.run([*cmd, *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=out,
                                  text=True, timeout=timeout)
            out.write(proc.stdout)
        if proc.returncode != 0:
            tail = (LOG_DIR / "compose.log").read_text()[-3000:]
            raise CheckFailed(f"docker-compose {' '.join(args[:2])} failed ({proc.returncode}):\n{tail}")
        return proc.stdout

    def containers(self, service: str, all_states: bool = True) -> list[str]:
        out = self.engine.docker("ps", *(["-a"] if all_states else []), "-q", "--no-trunc",
                                 "--filter", f"label=com.docker.compose.project={PROJECT}",
                                 "--filter", f"label=com.docker.compose.service={service}").stdout
        return out.split()

    def inspect(self, container: str, template: str) -> str:
        return self.engine.docker("inspect", "-f", template, container).stdout.strip()

    def index_size(self) -> int:
        return self.api.get("/health").json()["index_size"]

    def post_event(self, event: dict, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.api.post("/events", json=event, headers=headers).status_code

    # -- steps ------------------------------------------------------------------------------------
    def publish_defaults(self) -> str:
        """The production file alone publishes the API and UI on 127.0.0.1, unless PUBLISH_ADDR says so."""
        variables = {"REDIS_PASSWORD": "x"}
        for publish, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
            config = yaml.safe_load(self.compose("config", files=FILES[:1], variables={
                **variables, **({"PUBLISH_ADDR": publish} if publish else {})}))
            for service in ("recommender", "ui"):
                bound = {str(p.get("host_ip", p) if isinstance(p, dict) else p).split(":")[0]
                         for p in config["services"][service]["ports"]}
                if bound != {expected}:
                    raise CheckFailed(f"{service} published on {bound}, expected {expected} (PUBLISH_ADDR={publish})")
        return "API and UI published on 127.0.0.1 by default, on PUBLISH_ADDR when set"

    def base_images(self) -> str:
        images, reasons = resolve_base_images(self.engine, log)
        self.variables.update(images)
        lines = []
        for variable, image in images.items():
            size = self.engine.image_size(image) / 1e6
            why = f"; {reasons[variable]}" if variable in reasons else ""
            lines.append(f"{variable}={image} ({size:.0f} MB){why}")
        return "\n".join(lines)

    def build(self) -> str:
        self.merge_files()
        began = time.monotonic()
        self.compose("build", "worker", timeout=3600)
        self.engine.docker("image", "prune", "-f")  # layers of earlier builds: disk, not cache
        size = self.engine.image_size("ternrec:latest") / 1e6
        self.figures["app image"] = f"{size:.0f} MB"
        return f"ternrec:latest built in {time.monotonic() - began:.0f} s, {size:.0f} MB"

    def up(self) -> str:
        self.events.start()
        self.since = time.time_ns() - 1_000_000_000
        began = time.monotonic()
        self.compose("up", "-d", "--no-build", "--scale", "worker=2")
        config = yaml.safe_load(self.compose("config"))
        gates = {name: service["depends_on"] for name, service in config["services"].items()
                 if isinstance(service.get("depends_on"), dict)}
        lines = verify_start_order(self.events, gates, self.since)
        services = {e.service for e in self.events.events}
        order = sorted(services, key=lambda s: self.events.first(s, "start", self.since) or 0)
        return (f"up in {time.monotonic() - began:.0f} s; first starts: {' < '.join(order)}\n"
                + "\n".join(lines))

    def catalog_searchable(self) -> str:
        from ingest.catalog import load_items

        self.catalog_size = len(load_items())
        # The replay streams the catalog on the bulk lane (ingest.replay's default): that lane's group shares it.
        tracker = SharingTracker(GroupProbe(self.bootstrap, worker_group("bulk")))
        began = time.monotonic()

        def done() -> bool:
            tracker.sample()
            return self.index_size() >= self.catalog_size and len(tracker.credited) >= 2

        try:
            wait_for(done, 900, f"{self.catalog_size} books searchable and both workers credited", interval=2)
        finally:
            tracker.probe.close()
        if self.index_size() != self.catalog_size:
            raise CheckFailed(f"index_size {self.index_size()} != {self.catalog_size} books replayed")
        replay = self.containers("replay")[0]
        wait_for(lambda: self.inspect(replay, "{{.State.Status}}") == "exited", 120, "replay finished")
        if self.inspect(replay, "{{.State.ExitCode}}") != "0":
            raise CheckFailed(f"replay exited {self.inspect(replay, '{{.State.ExitCode}}')}")
        return (f"index_size {self.catalog_size} = books replayed, {time.monotonic() - began:.0f} s after up; "
                f"{len(tracker.credited)} of {len(tracker.members_seen)} worker group members committed "
                f"progress on partitions they owned")

    def queries(self) -> str:
        from ingest.catalog import load_interactions, load_items

        items = load_items()
        for item in (items[0], items[len(items) // 2], items[-1]):
            answer = self.api.get(f"/items/{item.item_id}/similar", params={"k": 10})
            ids = [hit["item_id"] for hit in answer.json()["items"]] if answer.status_code == 200 else []
            if answer.status_code != 200 or not ids or len(set(ids)) != len(ids) or item.item_id in ids:
                raise CheckFailed(f"/items/{item.item_id}/similar: {answer.status_code} {answer.text[:300]}")
        if self.api.get("/items/no-such-book/similar").status_code != 404:
            raise CheckFailed("an unknown item is not a 404")
        pairs = load_interactions()
        user = str(pairs.user_id.iloc[0])
        known = {item.item_id for item in items}
        seen = set(pairs.item_id[pairs.user_id == user]) & known

        def profile_complete():
            answer = self.api.get(f"/users/{user}/recommendations", params={"k": 20}).json()
            return answer if answer.get("seen_count") == len(seen) else None

        answer = wait_for(profile_complete, 300, f"user {user}'s {len(seen)} replayed books in the profile")
        picks = [hit["item_id"] for hit in answer["items"]]
        if not picks or set(picks) & seen:
            raise CheckFailed(f"recommendations for {user}: {picks} (seen: {sorted(set(picks) & seen)})")
        page = httpx.get(self.ui_url, timeout=10)
        health = httpx.get(f"{self.ui_url}/_stcore/health", timeout=10)
        if page.status_code != 200 or health.status_code != 200:
            raise CheckFailed(f"UI: / {page.status_code}, /_stcore/health {health.status_code}")
        self.user, self.seen = user, seen
        listening = listening_addresses()
        if listening - {"127.0.0.1", "::1"}:
            raise CheckFailed(f"sockets listening beyond loopback: {sorted(listening)}")
        return (f"similar items for 3 books, 404 for an unknown one; user {user}: {len(picks)} picks, none of "
                f"{len(seen)} seen books; UI 200; every listening socket on {sorted(listening)}")

    def write_key(self) -> str:
        event = {"type": "interaction", "user_id": "compose-check-user", "item_id": "1", "kind": "to_read"}
        statuses = (self.post_event(event, None), self.post_event(event, "wrong-key"),
                    self.post_event(event, self.api_key))
        if statuses != (401, 401, 202):
            raise CheckFailed(f"POST /events without / with a wrong / with the key: {statuses}, expected 401 401 202")
        if self.api.get("/health").status_code != 200:
            raise CheckFailed("reads need the key")
        return "POST /events: 401 without the key, 401 with a wrong one, 202 with it; reads open"

    def worker_kills(self) -> str:
        base = self.index_size()
        new = [{"type": "item_upsert", "item_id": f"compose-check-{i}", "title": f"Compose check book {i}",
                "text": f"Book {i} of the compose check, about {['ships', 'maps', 'bees', 'tides'][i % 4]} "
                        f"and the year {1900 + i % 120}."} for i in range(NEW_ITEMS)]
        # Half before the kills, half right after them: the workers could encode the first half as
        # fast as it was posted (all 2,000 were once indexed before the kills), never the second.
        first, rest = new[:NEW_ITEMS // 2], new[NEW_ITEMS // 2:]
        self._post_books(first)
        wait_for(lambda: self.index_size() >= base + 50, 300, "the new books being encoded", interval=0.2)
        crashed, killed = self.containers("worker", all_states=False)[:2]
        os.kill(int(self.inspect(crashed, "{{.State.Pid}}")), signal.SIGKILL)  # a crash, as the OOM killer does
        self.engine.docker("kill", killed)  # an operator's kill: Docker leaves it down (a manual stop)
        in_flight = base + len(first) - self.index_size() + len(rest)
        self._post_books(rest)
        wait_for(lambda: self.inspect(crashed, "{{.State.Running}} {{.RestartCount}}") == "true 1", 120,
                 "the crashed worker restarted by its restart policy")
        state = self.inspect(killed, "{{.State.Status}} {{.RestartCount}}")
        if state != "exited 0":
            raise CheckFailed(f"the docker-killed worker: {state}, expected exited and not restarted")
        self.compose("up", "-d", "--no-build", "--scale", "worker=2", "worker")
        if self.inspect(killed, "{{.State.Running}}") != "true":
            raise CheckFailed("`up` did not bring the docker-killed worker back")
        wait_for(lambda: self.index_size() >= base + NEW_ITEMS, 600, f"{NEW_ITEMS} new books searchable")
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda e: self.api.get(f"/items/{e['item_id']}/similar", params={"k": 1}).status_code,
                                  new))
        if found.count(200) != NEW_ITEMS or self.index_size() != base + NEW_ITEMS:
            raise CheckFailed(f"after the kills: {found.count(200)} of {NEW_ITEMS} new books found, "
                              f"index_size {self.index_size()} (expected {base + NEW_ITEMS})")
        return (f"{NEW_ITEMS} books posted; {in_flight} not yet indexed when one worker was SIGKILLed (restart "
                f"policy restarted it) and the other `docker kill`ed (left down by Docker, back with `up`), "
                f"{len(rest)} of them posted just after the kills; "
                f"all {NEW_ITEMS} found afterwards, index_size exactly {base + NEW_ITEMS}")

    def _post_books(self, events: list[dict]) -> None:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda e: self.post_event(e, self.api_key), events))
        if set(statuses) != {202}:
            raise CheckFailed(f"posting {len(events)} books: statuses {sorted(set(statuses))}")

    def volumes_kept(self) -> str:
        before, offsets = self.index_size(), self._end_offsets()
        self.compose("down")
        volumes = self.engine.docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}")
        kept = sorted(volumes.stdout.split())
        self.compose("up", "-d", "--no-build", "--scale", "worker=2", "kafka", "redis", "topic-init", "worker",
                     "recommender", "ui")
        if self.containers("replay"):
            raise CheckFailed("the replay ran again")
        after = wait_for(lambda: self.index_size() or None, 300, "the recommender back")
        if after != before or self._end_offsets() != offsets:
            raise CheckFailed(f"after down/up: index_size {after} (was {before}), topic offsets "
                              f"{self._end_offsets()} (were {offsets})")
        seen = self.api.get(f"/users/{self.user}/recommendations").json().get("seen_count")
        if seen != len(self.seen):
            raise CheckFailed(f"user {self.user}'s profile after down/up: seen_count {seen}, was {len(self.seen)}")
        return (f"down + up without the replay: index_size {after} bootstrapped from Redis, {sum(offsets.values())} "
                f"records kept in the topics, user profile kept; volumes {', '.join(kept)}")

    def _end_offsets(self) -> dict[str, int]:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id="compose-check")
        try:
            topics = [t for t in consumer.topics() if not t.startswith("__")]
            partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)]
            ends = consumer.end_offsets(partitions)
        finally:
            consumer.close()
        return {t: sum(v for tp, v in ends.items() if tp.topic == t) for t in sorted(topics)}

    def teardown(self) -> None:
        for container in self.engine.docker("ps", "-aq", check=False).stdout.split():
            name = self.inspect(container, "{{.Name}}").lstrip("/")
            logs = self.engine.docker("logs", container, check=False)
            (LOG_DIR / f"{name}.log").write_text(logs.stdout + logs.stderr)
        self.events.stop()
        try:
            self.compose("down", "-v", "--remove-orphans", timeout=300)
        except CheckFailed as exc:
            log(f"teardown: {exc}")


STEPS = (
    ("publish defaults", Stack.publish_defaults),
    ("base images", Stack.base_images),
    ("app image builds", Stack.build),
    ("up, in declared order", Stack.up),
    ("catalog searchable, workers share", Stack.catalog_searchable),
    ("similar / recommendations / UI", Stack.queries),
    ("worker kills lose nothing", Stack.worker_kills),
    ("down + up keeps the data", Stack.volumes_kept),
    ("write key", Stack.write_key),
)


def run_check() -> int:
    """Inside the loopback-only namespace: the engine, the stack, the steps, the summary."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    if [line.split(":")[1].strip() for line in links.splitlines()] != ["lo"]:
        raise SystemExit(f"the check's network namespace has more than loopback:\n{links}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally blocks below
    began, load = time.monotonic(), os.getloadavg()[0]
    results: list[tuple[str, bool, str, float]] = []
    with PrivateDocker(log_dir=LOG_DIR, log=log) as engine, serve(wheelhouse_dir()) as url:
        stack = Stack(engine, url)
        try:
            for name, step in STEPS:
                log(f"{name} ...")
                t0 = time.monotonic()
                try:
                    detail = step(stack)
                except CheckFailed as exc:
                    results.append((name, False, str(exc), time.monotonic() - t0))
                    break
                results.append((name, True, detail, time.monotonic() - t0))
                log(f"{name}: ok ({time.monotonic() - t0:.0f} s)")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            stack.teardown()
    print("\ncompose check summary")
    for name, ok, detail, seconds in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name} ({seconds:.0f} s)")
        print("".join(f"      {line}\n" for line in detail.splitlines()), end="")
    passed = len(results) == len(STEPS) and all(ok for _, ok, _, _ in results)
    print(f"{'PASSED' if passed else 'FAILED'} in {time.monotonic() - began:.0f} s (load average {load:.2f} at the "
          f"start, {os.getloadavg()[0]:.2f} at the end); logs in {LOG_DIR}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and run docker-compose.yml for real, loopback only.")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # set by the re-exec below
    args = parser.parse_args(argv)
    if args.inside:
        return run_check()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in LOG_DIR.glob("*.log"):
        old.unlink()
    # Set-up: the only steps that may download (Debian mirror, PyPI); cached.
    prepare_rootfs(log)
    prepare_wheelhouse(log)
    proc = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-m", "deploy.compose_check", "--inside"],
                            cwd=REPO_ROOT)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the check got the same Ctrl-C and is cleaning up: wait for it


if __name__ == "__main__":
    sys.exit(main())
