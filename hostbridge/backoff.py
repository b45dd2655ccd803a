"""When to connect to a guest's channel again: a backoff that outlives one connect, and a budget.

A guest (or whatever listens on its channel) that accepts each connection and closes it at once
never makes connect() fail, so a backoff that only grows on connect errors, and restarts with each
call, lets it drive thousands of reconnects a second. The session therefore keeps one Backoff for
the life of its channel: every link that ends before it was stable (synced, then up STABLE_LINK
seconds) makes the next connect wait longer, and only a stable link resets it. The budget caps
successful connects per minute whatever the backoff says: a guest that stays up just long enough
to reset the backoff still cannot make the bridge reconnect more than ``per_minute`` times.

Pure (no I/O, no sleeping): the session asks how long to wait and sleeps itself.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

STABLE_LINK = 10.0  # seconds a synced link must last before its end resets the backoff
BUDGET_WINDOW = 60.0  # seconds over which ReconnectBudget counts connects


class Backoff:
    """Exponential delays with full jitter: ``first`` doubling up to ``maximum``."""

    __slots__ = ("first", "maximum", "_next", "_random")

    def __init__(
        self, first: float, maximum: float, rand: Callable[[], float] = random.random
    ) -> None:
        self.first = first
        self.maximum = max(first, maximum)
        self._next = first
        self._random = rand

    def delay(self) -> float:
        """The next delay (and double the one after). Jitter in [d/2, d): a host restart must not
        make a thousand sessions retry in step."""
        d = self._next
        self._next = min(d * 2, self.maximum)
        return d * (0.5 + self._random() / 2)

    def reset(self) -> None:
        self._next = self.first

    @property
    def peak(self) -> float:
        """The delay the next call starts from (before jitter)."""
        return self._next


class ReconnectBudget:
    """At most ``per_minute`` connects in any BUDGET_WINDOW seconds."""

    __slots__ = ("per_minute", "_times", "_clock")

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._times: deque[float] = deque(maxlen=per_minute)
        self._clock = clock

    def wait(self) -> float:
        """Seconds until one more connect fits in the budget (0: now)."""
        if len(self._times) < self.per_minute:
            return 0.0
        return max(0.0, self._times[0] + BUDGET_WINDOW - self._clock())

    def spend(self) -> None:
        """Count one connect, now."""
        self._times.append(self._clock())


__all__ = ["STABLE_LINK", "Backoff", "ReconnectBudget"]
