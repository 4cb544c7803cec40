"""Outages on `make stack`, answered and survived: the broker or redis-server is SIGKILLed while new
books and interactions are posted; the stack restarts it in place, the worker and the recommender
recover by themselves, and every event answered 202 is processed exactly once in effect."""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.processes import start_stack
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
USER = "outage-user"
AFTER_RESTART = 25  # books the restarted dependency must take before the poster stops


class Output:
    """The stack's output, read on a thread so the test can post and watch at the same time."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines[after:]:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r}:\n{''.join(self.lines)}"
                self._new.wait(left)

    def text(self) -> str:
        with self._new:
            return "".join(self.lines)


@dataclass
class Poster:
    """Posts a new book every 40 ms (and an interaction with a book accepted earlier) until stopped."""

    url: str
    prefix: str
    answers: list[tuple[str, dict, int, float, httpx.Headers]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for n in itertools.count():
                if self.stop.wait(0.04):
                    return
                accepted = [e["item_id"] for _, e, status, _, _ in self.answers
                            if status == 202 and e["type"] == "item_upsert"]
                events = [{"type": "item_upsert", "item_id": f"{self.prefix}-{n}", "title": f"Outage book {n}",
                           "text": f"a book posted while things break, number {n}"}]
                if accepted and n % 3 == 0:
                    events.append({"type": "interaction", "user_id": USER, "item_id": accepted[-1], "kind": "read"})
                for event in events:
                    began = time.monotonic()
                    try:
                        r = client.post(f"{self.url}/events", json=event)
                        status, headers = r.status_code, r.headers
                    except httpx.HTTPError as exc:  # recorded: the assertions say no request may fail so
                        status, headers = -1, httpx.Headers({"error": repr(exc)})
                    self.answers.append(("events", event, status, time.monotonic() - began, headers))

    def accepted(self, kind: str) -> set[str]:
        return {e["item_id"] for _, e, status, _, _ in self.answers if status == 202 and e["type"] == kind}


def searchable(client: httpx.Client, url: str, item_id: str) -> bool:
    r = client.get(f"{url}/items/{item_id}/similar", params={"k": 20})
    if r.status_code != 200:
        return False
    ids = [i["item_id"] for i in r.json()["items"]]
    assert len(ids) == len(set(ids)), f"duplicates in the neighbours of {item_id}: {ids}"
    return True


def run_outage(victim: str) -> None:
    proc, port = start_stack("--no-ui", "--no-replay")
    url = f"http://127.0.0.1:{port}"
    out = Output(proc)
    poster = Poster(url, f"{victim}-{os.getpid()}")
    try:
        out.wait_for(r"\[stack\] ready", timeout=180)
        pids = re.search(r"\(pid (\d+)\) and Redis .* \(pid (\d+)\)", out.text())
        victim_pid = int(pids.group(1) if victim == "kafka" else pids.group(2))
        services = dict(re.findall(r"started (\S+) \(pid (\d+)", out.text()))

        thread = threading.Thread(target=poster.run, daemon=True)
        thread.start()
        time.sleep(3)
        mark = len(out.lines)
        before_kill = len(poster.accepted("item_upsert"))
        os.kill(victim_pid, signal.SIGKILL)
        out.wait_for(rf"\[stack\] {victim} restarted", timeout=90, after=mark)
        # Keep posting against the restarted dependency until it has taken AFTER_RESTART books (a
        # count, not a time: how many a few seconds bring depends on how fast the restart settles).
        at_restart = len(poster.accepted("item_upsert"))
        wait_for(lambda: len(poster.accepted("item_upsert")) >= at_restart + AFTER_RESTART, timeout=60,
                 what=f"{AFTER_RESTART} books accepted after the {victim} restart")
        poster.stop.set()
        thread.join(60)

        statuses = {status for _, _, status, _, _ in poster.answers}
        assert statuses <= {202, 503}, f"answers other than 202/503: {statuses}"
        assert 503 not in statuses or all("retry-after" in h for *_, status, _, h in poster.answers if status == 503)
        slowest = max(seconds for _, _, _, seconds, _ in poster.answers)
        refused = sum(status == 503 for _, _, status, _, _ in poster.answers)
        print(f"{victim}: {len(poster.answers)} POSTs, {refused} answered 503, slowest {slowest:.2f} s")
        assert slowest < 5, f"a POST /events took {slowest:.1f} s"  # bounded (about 2 s), never the 120 s hang
        books, reads = poster.accepted("item_upsert"), poster.accepted("interaction")
        assert before_kill > 0  # accepted before the outage, and (waited for above) after it

        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 120
            pending = set(books)
            while pending and time.monotonic() < deadline:
                pending = {i for i in pending if not searchable(client, url, i)}
                time.sleep(0.5)
            assert not pending, f"{len(pending)} accepted books never became searchable, e.g. {sorted(pending)[:5]}"
            posted = {e["item_id"] for _, e, *_ in poster.answers if e["type"] == "item_upsert"}
            found = {i for i in posted if searchable(client, url, i)}
            # Nothing extra and nothing twice: the index holds exactly the books that made it in.
            assert client.get(f"{url}/health").json()["index_size"] == len(found)
            # Every accepted read counted once (a read answered 503 may still have reached the broker).
            tried = {e["item_id"] for _, e, *_ in poster.answers if e["type"] == "interaction"}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen = client.get(f"{url}/users/{USER}/recommendations").json().get("seen_count", -1)
                if seen >= len(reads):
                    break
                time.sleep(0.5)
            assert len(reads) <= seen <= len(tried), (seen, len(reads), len(tried))
        # Recovered by themselves: neither the worker nor the recommender was restarted.
        assert dict(re.findall(r"started (\S+) \(pid (\d+)", out.text())) == services, out.text()
    finally:
        poster.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_sigkilled_broker_is_restarted_and_nothing_accepted_is_lost(kafka):  # `kafka`: jars fetched
    run_outage("kafka")


def test_a_sigkilled_redis_is_restarted_and_nothing_accepted_is_lost(kafka):
    run_outage("redis")
