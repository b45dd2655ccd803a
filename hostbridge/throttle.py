"""How much a guest may send: token buckets on the frames and bytes read from it.

When a guest sends more, the bridge stops reading it for a while. That pushes back on it through
the channel (QEMU stops taking its bytes, and its writes block), and keeps one flooding guest
from taking the event loop from the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ovmsys.ratelimit import RateLimitedLog

from .config import Limits

PAUSE_MAX = 5.0  # never stop reading a guest for longer than this at once


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved. take() may run into debt and says how
    long to wait until the debt is paid: the caller stops reading for that long (backpressure)."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def take(self, n: float) -> float:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate


class Throttle:
    """The buckets of one guest. Per read: frames() for what it decoded, then pause()."""

    def __init__(self, limits: Limits, warn: RateLimitedLog) -> None:
        self._limits = limits
        self._warn = warn
        self._frames = TokenBucket(limits.frames_per_s, limits.frames_burst)
        self._bytes = TokenBucket(limits.bytes_per_s, limits.bytes_burst)
        self._frames_delay = 0.0

    def frames(self, n: int) -> bool:
        """Pay for ``n`` decoded frames; True when that went over the rate."""
        self._frames_delay = self._frames.take(n) if n else 0.0
        return self._frames_delay > 0

    def pause(self, nbytes: int) -> float:
        """Pay for ``nbytes`` read; how long to stop reading the guest now (0: go on)."""
        delay = max(self._bytes.take(nbytes), self._frames_delay)
        if delay <= 0:
            return 0.0
        self._warn.warn(
            "rate",
            "guest sends faster than %.0f frames/s or %.0f bytes/s; reading it is slowed down",
            self._limits.frames_per_s,
            self._limits.bytes_per_s,
        )
        return min(delay, PAUSE_MAX)
