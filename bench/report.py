"""Writes benchmark results: JSON into reports/, a section into BENCHMARKS.md."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from pathlib import Path

from ingest.settings import REPO_ROOT

REPORTS = REPO_ROOT / "reports"
BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_json(name: str, data: dict) -> Path:
    REPORTS.mkdir(exist_ok=True)
    path = REPORTS / f"{name}.json"
    path.write_text(json.dumps({**data, "machine": machine()}, indent=2) + "\n")
    return path


def update_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replaces `## {title}` (up to the next `## ` heading) in BENCHMARKS.md, or appends it.

    `body` may start with the heading itself; it is not repeated.
    """
    body = body.strip()
    if body.startswith(f"## {title}\n"):
        body = body[len(f"## {title}\n"):]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
