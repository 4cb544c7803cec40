"""`make bench`: every benchmark, one after the other (they share two cores; never in parallel).

Each writes reports/<name>.json and its section of BENCHMARKS.md. `--only a,b` runs a subset.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "services": [sys.executable, "-m", "bench.services"],
    "replay": [sys.executable, "-m", "bench.replay"],
    "kernel": [sys.executable, "-m", "bench.kernel"],
    "speed": [sys.executable, "-m", "bench.speed"],
    "footprint": [sys.executable, "-m", "bench.footprint"],
    "quality": [sys.executable, "-m", "bench.quality", "report", "--keep"],
    "ann": [sys.executable, "-m", "bench.ann"],
    "pipeline": [sys.executable, "-m", "bench.pipeline"],
    "recommendation": [sys.executable, "-m", "bench.recommendation"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(names) - BENCHMARKS.keys()
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    failed = []
    for name in names:
        print(f"=== {name}: {' '.join(BENCHMARKS[name][1:])}", flush=True)
        began = time.perf_counter()
        if subprocess.run(BENCHMARKS[name]).returncode != 0:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - began:.0f} s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
