"""`python -m ingest.services`: fetch the Kafka broker jars, or run Kafka + Redis until stopped.

    python -m ingest.services fetch-kafka   # Kafka broker jars from Maven Central (cached)
    python -m ingest.services up            # Kafka + Redis until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from urllib.parse import quote

from ingest.services.kafka_broker import LocalKafka, fetch_kafka_jars, kafka_jars_ready
from ingest.services.process import ServiceError
from ingest.services.redis_server import LocalRedis
from ingest.settings import KAFKA_VERSION, Settings


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
