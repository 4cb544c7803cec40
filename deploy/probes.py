"""What the compose check observes the stack with: the engine's event stream, the consumer group
of the encoder workers, the listening sockets of the check's network namespace, and a wait loop.

All of them only read: nothing here changes the stack.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from dataclasses import dataclass

from deploy.dockerd import DOCKER_CLI, PrivateDocker

SERVICE_LABEL = "com.docker.compose.service"


class CheckFailed(AssertionError):
    """A property of the stack the check verifies does not hold."""


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """Polls until `predicate()` returns something truthy (returned); CheckFailed after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a service still starting: connection refused, 503, ...
            last_error = exc
        time.sleep(interval)
    raise CheckFailed(f"{what}: not after {timeout:.0f} s" + (f" (last error: {last_error})" if last_error else ""))


# --------------------------------------------------------------------------- container events


@dataclass(frozen=True)
class ContainerEvent:
    ns: int  # engine time, nanoseconds
    action: str  # start, die, kill, health_status: healthy, ...
    service: str
    container: str
    exit_code: int | None


class EventRecorder:
    """`docker events` for the project's containers, read on a thread from start() to stop()."""

    def __init__(self, engine: PrivateDocker, project: str):
        self.engine = engine
        self.project = project
        self.events: list[ContainerEvent] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [DOCKER_CLI, "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", f"label=com.docker.compose.project={self.project}"],
            env=self.engine.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            event = json.loads(line)
            attrs = event.get("Actor", {}).get("Attributes", {})
            code = attrs.get("exitCode")
            self.events.append(ContainerEvent(int(event["timeNano"]), event["Action"], attrs.get(SERVICE_LABEL, "?"),
                                              event["Actor"]["ID"], None if code is None else int(code)))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        if self._thread is not None:
            self._thread.join(5)

    def first(self, service: str, action: str, since: int = 0, exit_code: int | None = None) -> int | None:
        times = [e.ns for e in self.events if e.service == service and e.action == action and e.ns >= since
                 and (exit_code is None or e.exit_code == exit_code)]
        return min(times) if times else None

    def all(self, service: str, action: str, since: int = 0) -> list[ContainerEvent]:
        return [e for e in self.events if e.service == service and e.action == action and e.ns >= since]


# What each depends_on condition waits for, as an engine event of the dependency.
GATE_EVENTS = {"service_started": ("start", None), "service_healthy": ("health_status: healthy", None),
               "service_completed_successfully": ("die", 0)}


def verify_start_order(events: EventRecorder, depends_on: dict[str, dict], since: int) -> list[str]:
    """Every container start of a service came after each of its depends_on conditions held.

    `depends_on`: {service: {dependency: {"condition": ...}}}, from the merged compose config.
    Returns one line per gate, with the margin by which the gate held."""
    lines = []
    for service, deps in depends_on.items():
        starts = events.all(service, "start", since)
        if not starts:
            raise CheckFailed(f"{service} never started")
        for dependency, spec in deps.items():
            action, code = GATE_EVENTS[spec["condition"]]
            gate = events.first(dependency, action, since, exit_code=code)
            if gate is None:
                raise CheckFailed(f"{service} started but {dependency} never reached {spec['condition']}")
            early = [s for s in starts if s.ns < gate]
            if early:
                raise CheckFailed(f"{service} started {(gate - early[0].ns) / 1e9:.1f} s before {dependency} "
                                  f"reached {spec['condition']}")
            lines.append(f"{service} started {(starts[0].ns - gate) / 1e9:5.1f} s after {dependency} "
                         f"{spec['condition'].removeprefix('service_')}")
    return lines


# --------------------------------------------------------------------------- consumer group


class GroupProbe:
    """Who owns which partition of a consumer group, and how far each has committed."""

    def __init__(self, bootstrap: str, group: str):
        from kafka import KafkaAdminClient  # the check's venv has the app's Kafka client

        self.group = group
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="compose-check")

    def owners(self) -> dict[tuple[str, int], str]:
        """{(topic, partition): member id} of the group's current assignment."""
        group = self.admin.describe_groups([self.group])[self.group]
        owned = {}
        for member in group.get("members") or []:
            assignment = member.get("member_assignment")
            for topic, partitions in _assigned(assignment):
                for partition in partitions:
                    owned[(topic, partition)] = member["member_id"]
        return owned

    def committed(self) -> dict[tuple[str, int], int]:
        offsets = self.admin.list_group_offsets(self.group).get(self.group, {})
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}

    def close(self) -> None:
        self.admin.close()


def _assigned(assignment) -> list:
    if assignment is None:
        return []
    if isinstance(assignment, dict):  # to_dict() form
        return [(a["topic"], a["partitions"]) for a in assignment.get("assigned_partitions", [])]
    return list(assignment.assignment)


class SharingTracker:
    """Credits a member with work when a partition it owned in two samples in a row advanced."""

    def __init__(self, probe: GroupProbe):
        self.probe = probe
        self.previous: tuple[dict, dict] | None = None
        self.credited: set[str] = set()
        self.members_seen: set[str] = set()

    def sample(self) -> None:
        owners, committed = self.probe.owners(), self.probe.committed()
        self.members_seen |= set(owners.values())
        if self.previous is not None:
            old_owners, old_committed = self.previous
            for tp, member in owners.items():
                if old_owners.get(tp) == member and committed.get(tp, -1) > old_committed.get(tp, -1) >= 0:
                    self.credited.add(member)
        self.previous = (owners, committed)


# --------------------------------------------------------------------------- sockets


def listening_addresses() -> set[str]:
    """Local addresses of every listening TCP socket in this network namespace."""
    found = set()
    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address = fields[1].split(":")[0]
            found.add(_decode_address(address, width))
    return found


def _decode_address(hex_address: str, width: int) -> str:
    """/proc/net/tcp{,6} notation (little-endian words) to text; IPv4-mapped IPv6 as plain IPv4."""
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(address.ipv4_mapped or address)
