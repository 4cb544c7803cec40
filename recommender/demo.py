"""`make demo`: the whole product in one process, on embedded defaults.

The in-process event log and an embedded store stand in for Kafka and Redis; the encoder worker,
profile updater, index updater and HTTP API run as in production (recommender.runtime). The
catalog and a sample of the interactions are replayed into it with a progress bar, and the
Streamlit UI is started beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from tqdm import tqdm

from ingest.replay import Selection, replay, selected_events
from ingest.services.process import spawn_child, stop_child
from ingest.settings import REPO_ROOT, Settings
from recommender.runtime import Runtime

UI_APP = REPO_ROOT / "ui" / "app.py"
DEFAULT_USER = "1"  # the user the UI opens on


def start_http(runtime: Runtime, settings: Settings):
    import uvicorn

    from recommender.service import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(runtime.recommender), host=settings.http_host,
                                           port=settings.http_port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, name="http", daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def start_ui(settings: Settings) -> subprocess.Popen | None:
    """Streamlit as a child that dies with the demo, even when the demo is SIGKILLed."""
    if not UI_APP.is_file():
        return None
    env = {**os.environ, "TERNREC_SERVICE_URL": settings.resolved_service_url}
    return spawn_child(
        [sys.executable, "-m", "streamlit", "run", str(UI_APP), "--server.port", str(settings.ui_port),
         "--server.address", settings.http_host, "--server.headless", "true",
         "--browser.gatherUsageStats", "false"], cwd=REPO_ROOT, env=env, stdout=None)


def wait_until_indexed(runtime: Runtime, total: int, stop: threading.Event) -> None:
    with tqdm(total=total, desc="encode+index", unit="item", dynamic_ncols=True) as bar:
        while len(runtime.index) < total and not stop.is_set():
            bar.update(len(runtime.index) - bar.n)
            time.sleep(0.25)
        bar.update(len(runtime.index) - bar.n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="replay only the first N books (default: all 10,000)")
    parser.add_argument("--users", type=int, default=2000, help="replay the interactions of N users")
    parser.add_argument("--no-ui", action="store_true", help="do not start the Streamlit UI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    began = time.perf_counter()
    settings = Settings(kafka_bootstrap="", redis_url="")
    # The UI first: it shows "starting" while the model loads, instead of a refused connection.
    ui = None if args.no_ui else start_ui(settings)
    runtime = None
    try:
        print("loading the encoder ...", flush=True)
        runtime = Runtime(settings, with_workers=True)
        print(f"encoder: {runtime.encoder.name} (dim {runtime.encoder.dim})", flush=True)
        runtime.start()
        start_http(runtime, settings)
        print(f"recommender API: {settings.resolved_service_url}", flush=True)
        if ui:
            print(f"UI:              http://{settings.http_host}:{settings.ui_port}", flush=True)

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        # Interleaved, each user's interactions after their books, and the books of the UI's
        # default user first: a personal list appears within seconds, not after the catalog.
        events = selected_events(Selection(limit=args.limit, users=args.users, interleave=True,
                                           first_user=DEFAULT_USER))
        summary = replay(runtime.event_log, settings, events, progress=True)
        print(summary, flush=True)
        items = sum(1 for e in events if e.type == "item_upsert")
        wait_until_indexed(runtime, items, stop)
        print(f"ready: {len(runtime.index)} items searchable, {time.perf_counter() - began:.1f} s after start",
              flush=True)
        stop.wait()
    finally:
        if ui:
            stop_child(ui, timeout=10)
        if runtime:
            runtime.stop()

if __name__ == "__main__":
    main()
