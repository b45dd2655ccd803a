"""Waiting with a deadline: every wait in the tests polls a condition and raises HarnessTimeout (an
assertion failure) once the deadline has passed; nothing sleeps as an assertion."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")

TIMEOUT = 15.0  # default deadline: generous, the machine is shared and may have 2 cores


class HarnessTimeout(AssertionError):
    """A wait ran out of time (an assertion failure for pytest)."""


class _Poll:
    """One wait: done() calls the condition, keeps its value, and raises once past the deadline."""

    def __init__(self, condition: Callable[[], T], timeout: float, what: str):
        self.condition, self.timeout, self.what = condition, timeout, what
        self.deadline = time.monotonic() + timeout
        self.value: T | None = None

    def done(self) -> bool:
        self.value = self.condition()
        if not self.value and time.monotonic() > self.deadline:
            raise HarnessTimeout("timed out after %.1fs waiting for %s" % (self.timeout, self.what))
        return bool(self.value)


def wait_for(
    condition: Callable[[], T],
    timeout: float = TIMEOUT,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``condition()`` until it returns a true value (returned) or raise HarnessTimeout."""
    poll = _Poll(condition, timeout, what)
    while not poll.done():
        time.sleep(interval)
    return poll.value


async def async_wait_for(
    condition: Callable[[], T], timeout: float = TIMEOUT, what: str = "condition"
) -> T:
    """wait_for for a coroutine: the event loop runs while it waits (polling every 20 ms)."""
    poll = _Poll(condition, timeout, what)
    while not poll.done():
        await asyncio.sleep(0.02)
    return poll.value
