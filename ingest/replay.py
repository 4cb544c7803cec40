"""Replay the goodbooks catalog and its interactions as events: `python -m ingest.replay`.

Streams the catalog as item upserts, then the `to_read` interactions (or both interleaved by a
simulated clock, each interaction after its book), into real Kafka (`--kafka-bootstrap` or
TERNREC_KAFKA_BOOTSTRAP) or, from Python, into any event log. Item events go to the bulk lane
(`item-backfill`) unless `--lane live` (to simulate live traffic). `--rate` paces it; a state file
makes it resumable: a rerun with the same selection continues after the last flushed event.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ingest.catalog import load_interactions, load_items
from ingest.eventlog import EventLog, EventProducer, ensure_topics, open_event_log
from ingest.schema import Event, Interaction
from ingest.settings import LANES, Settings, add_settings_flags, settings_from_args

FLUSH_EVERY = 1000  # events between flushes; the resume point advances only after a flush


@dataclass(frozen=True)
class Selection:
    """Which events a replay sends, in a deterministic order."""

    limit: int | None = None  # items
    users: int | None = None  # users whose interactions are replayed (None = all; 0 = none)
    interleave: bool = False
    first_user: str | None = None  # this user's books come first (a demo's default user)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Summary:
    sent: int = 0
    failed: int = 0
    skipped: int = 0  # already sent by an earlier, resumed run
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"sent {self.sent} events, failed {self.failed}, resumed past {self.skipped}, "
                f"{self.seconds:.1f} s, {self.events_per_s:,.0f} events/s")


def selected_events(selection: Selection) -> list[Event]:
    items = load_items()[: selection.limit]
    if selection.first_user is not None:
        pairs = load_interactions()
        theirs = set(pairs.item_id[pairs.user_id == selection.first_user])
        items = sorted(items, key=lambda item: item.item_id not in theirs)  # stable: theirs first
    item_events = [item.to_event() for item in items]
    if selection.users == 0:
        return list(item_events)
    pairs = load_interactions()
    known = {item.item_id for item in items}
    pairs = pairs[pairs.item_id.isin(known)]
    if selection.users is not None:
        users = pairs.user_id.drop_duplicates().head(selection.users)
        pairs = pairs[pairs.user_id.isin(users)]
    interactions = [Interaction(type="interaction", user_id=u, item_id=i, kind="to_read")
                    for u, i in zip(pairs.user_id, pairs.item_id, strict=True)]
    if not selection.interleave:
        return item_events + interactions
    # Simulated clock: item k appears at time k; interactions spread evenly over the same span,
    # never before their book.
    arrival = {e.item_id: k for k, e in enumerate(item_events)}
    span = max(len(item_events), 1) / max(len(interactions), 1)
    timed = [(float(k), 0, e) for k, e in enumerate(item_events)]
    timed += [(max(j * span, arrival[e.item_id] + 0.5), 1, e) for j, e in enumerate(interactions)]
    timed.sort(key=lambda t: (t[0], t[1]))
    return [e for _, _, e in timed]


class ResumeState:
    """How many events of one selection were flushed to one target, kept in a JSON file."""

    def __init__(self, path: Path | None, selection: Selection, target: str):
        self.path = path
        self.identity = {"selection": selection.key(), "target": target}

    def load(self) -> int:
        if self.path is None or not self.path.is_file():
            return 0
        state = json.loads(self.path.read_text())
        return state["sent"] if state.get("identity") == self.identity else 0

    def save(self, sent: int) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"identity": self.identity, "sent": sent}))
            tmp.replace(self.path)


def _paced(events: list[Event], start: int, rate: float | None) -> Iterator[Event]:
    began = time.perf_counter()
    for n, event in enumerate(events[start:]):
        if rate:
            ahead = n / rate - (time.perf_counter() - began)
            if ahead > 0:
                time.sleep(ahead)
        yield event


def replay(event_log: EventLog, settings: Settings, events: list[Event], rate: float | None = None,
           state: ResumeState | None = None, progress: bool = True, lane: str = "bulk") -> Summary:
    """Sends `events` (from where `state` left off; item events in `lane`) and returns the summary."""
    ensure_topics(event_log, settings)
    producer = EventProducer(event_log, settings, lane=lane)
    summary = Summary(skipped=state.load() if state else 0)
    began = time.perf_counter()
    bar = tqdm(total=len(events), initial=summary.skipped, unit="ev", disable=not progress,
               desc="replay", dynamic_ncols=True)
    position = summary.skipped
    try:
        for event in _paced(events, summary.skipped, rate):
            try:
                producer.send(event)
                summary.sent += 1
            except Exception as exc:  # a send that fails is counted, and the replay goes on
                summary.failed += 1
                bar.write(f"send failed for {event.key}: {exc}")
            position += 1
            bar.update()
            if position % FLUSH_EVERY == 0:
                producer.flush()
                if state:
                    state.save(position)
        producer.flush()
        if state:
            state.save(position)
    finally:
        bar.close()
        producer.close()
        summary.seconds = time.perf_counter() - began
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay goodbooks-10k items and interactions as events.")
    add_settings_flags(parser)
    parser.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    parser.add_argument("--limit", type=int, help="replay only the first N books")
    parser.add_argument("--users", type=int, help="interactions of the first N users only (0 = none)")
    parser.add_argument("--interleave", action="store_true",
                        help="interleave interactions with items by a simulated clock")
    parser.add_argument("--lane", choices=LANES, default="bulk",
                        help="lane of the item events (default bulk; live simulates live traffic)")
    parser.add_argument("--state", type=Path, help="resume-state file (default: under ~/.cache/ternrec)")
    parser.add_argument("--restart", action="store_true", help="ignore saved progress, start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    settings = settings_from_args(args)
    if settings.embedded_log:
        parser.error("no Kafka bootstrap: set TERNREC_KAFKA_BOOTSTRAP or --kafka-bootstrap "
                     "(embedded mode replays from `make demo` itself)")
    selection = Selection(limit=args.limit, users=args.users, interleave=args.interleave)
    state_path = args.state or Path.home() / ".cache" / "ternrec" / "replay" / f"{selection.key()}.json"
    state = ResumeState(state_path, selection, target=f"{settings.kafka_bootstrap}/{settings.item_topic(args.lane)}")
    if args.restart:
        state.save(0)
    events = selected_events(selection)
    event_log = open_event_log(settings)
    try:
        summary = replay(event_log, settings, events, rate=args.rate, state=state,
                         progress=not args.no_progress, lane=args.lane)
    finally:
        event_log.close()
    print(summary)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
