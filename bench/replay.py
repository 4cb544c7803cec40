"""Replay throughput into a real Kafka broker: `python -m bench.replay`.

Streams the 10,000 catalog items and 50,000 interactions (as fast as possible, acks=all) into
fresh topics, three times, and reports events/s of each run and the median
(reports/replay.json, the "Replay" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import uuid

from bench.report import update_section, write_json
from ingest.kafka_log import KafkaLog
from ingest.replay import Selection, replay, selected_events
from ingest.services import LocalKafka
from ingest.settings import Settings

COMMAND = "python -m bench.replay"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interactions", type=int, default=50_000)
    args = parser.parse_args(argv)
    events = selected_events(Selection(users=5_000))
    items = [e for e in events if e.type == "item_upsert"]
    events = items + [e for e in events if e.type == "interaction"][: args.interactions]
    runs = []
    with LocalKafka(Settings()) as kafka:
        event_log = KafkaLog(kafka.bootstrap)
        for n in range(args.runs):
            prefix = uuid.uuid4().hex[:8]
            settings = Settings(kafka_bootstrap=kafka.bootstrap, **{
                f"topic_{t}": f"{prefix}-{t}" for t in ("item_events", "user_events", "item_embeddings",
                                                        "dead_letter")})
            summary = replay(event_log, settings, events, progress=False)
            runs.append({"sent": summary.sent, "failed": summary.failed, "seconds": round(summary.seconds, 2),
                         "events_per_s": round(summary.events_per_s, 1)})
            print(f"run {n + 1}: {summary}", flush=True)
        event_log.close()
    median = statistics.median(r["events_per_s"] for r in runs)
    write_json("replay", {"command": COMMAND, "events": len(events), "runs": runs, "median_events_per_s": median})
    update_section("Replay", "\n".join([
        f"Command: `{COMMAND}` — {len(events):,} events (10,000 item upserts + {args.interactions:,} "
        "interactions) into a real single-node Kafka broker on 127.0.0.1, acks=all, as fast as possible.", "",
        "| run | events/s | seconds |", "|---|---|---|",
        *[f"| {n + 1} | {r['events_per_s']:,.0f} | {r['seconds']} |" for n, r in enumerate(runs)],
        f"| **median** | **{median:,.0f}** | |"]))


if __name__ == "__main__":
    main()
