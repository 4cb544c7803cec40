"""Polling helper shared by the tests: wait for a condition with a deadline and a clear failure."""

import time


def wait_for(condition, timeout: float = 30.0, what: str = "condition", every: float = 0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
