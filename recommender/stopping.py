"""Stopping on SIGTERM, the same way in every service: within 10 s, whatever it is waiting for.

While a service starts (the broker or Redis not there yet, a model loading), SIGTERM and SIGINT
interrupt the wait at once: `abort_on_signal` turns them into StopRequested for the duration of a
block. Once it runs, they set a `threading.Event` its loops check, and every wait for a dependency
is bounded or watches that event, giving up with StopRequested (the work in hand is then left
uncommitted, so it is processed again: at-least-once loses nothing).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class StopRequested(Exception):
    """The service was told to stop while it waited (for a dependency, or while starting): the
    operation was not finished, and its input is left uncommitted."""


@contextlib.contextmanager
def abort_on_signal(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, `signals` raise StopRequested in the main thread; the previous handlers
    come back afterwards."""

    def abort(signum: int, _frame) -> None:
        raise StopRequested(f"{signal.Signals(signum).name} during start-up")

    previous = {sig: signal.signal(sig, abort) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
