"""The wheels the app image installs, fetched once from PyPI and served on loopback to offline builds.

`prepare_wheelhouse` (a set-up step: it downloads) runs `pip wheel` on the host for what the
Dockerfile installs: the core dependencies of pyproject.toml and its build requirements (the
native kernel is compiled in the image, under build isolation). Markers are evaluated by the
interpreter pip runs on, so it runs once with ours and once with Debian's python3 (what the local
Python images carry: e.g. 3.11.2 needs async-timeout for redis, 3.11.7 does not). The result is
cached under ~/.cache/ternrec/wheels/<hash of that list>. `serve` publishes it on 127.0.0.1:PORT for the image
build (PIP_NO_INDEX=1 PIP_FIND_LINKS=http://127.0.0.1:PORT/), which reaches nothing else. The
port is fixed (the check's network namespace is its own, so it is free): a build argument that
changed from run to run would invalidate Docker's layer cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import platform
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

from ingest.settings import REPO_ROOT

WHEELS = Path.home() / ".cache" / "ternrec" / "wheels"
STAMP = ".complete"
PORT = 3141


def requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"]]


def wheelhouse_dir() -> Path:
    key = hashlib.sha256("\n".join(requirements()).encode()).hexdigest()[:12]
    return WHEELS / key


def prepare_wheelhouse(log=print) -> Path:
    target = wheelhouse_dir()
    if (target / STAMP).exists():
        return target
    log(f"pip wheel: {len(requirements())} requirements into {target}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    reqs = target / "requirements.txt"
    reqs.write_text("\n".join(requirements()) + "\n")
    for python in _interpreters():
        proc = subprocess.run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(target), "-r", str(reqs)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{python} -m pip wheel failed ({proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
    (target / STAMP).write_text("\n".join(sorted(p.name for p in target.glob("*.whl"))) + "\n")
    for old in WHEELS.iterdir():  # wheelhouses of older requirement lists
        if old.is_dir() and old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _interpreters() -> list[str]:
    """Ours, and Debian's python3 when it is another release of the same Python."""
    found = [sys.executable]
    debian = Path("/usr/bin/python3")
    if debian.exists():
        theirs = subprocess.run([str(debian), "-c", "import platform; print(platform.python_version())"],
                                capture_output=True, text=True).stdout.strip().split(".")
        ours = platform.python_version().split(".")
        if theirs[:2] == ours[:2] and theirs != ours:
            found.append(str(debian))
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path, port: int = PORT) -> Iterator[str]:
    """The directory as a pip find-links page on 127.0.0.1 while the block runs; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        thread = threading.Thread(target=server.serve_forever, name="wheelhouse", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join()
