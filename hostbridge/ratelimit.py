"""Token buckets (how much a guest may send) and rate-limited warnings (how often we say so)."""

from __future__ import annotations

import logging
import time


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved. take() may run into debt and says how
    long to wait until the debt is paid: the caller stops reading for that long (backpressure)."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
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


class WarnOnce:
    """Log a kind of warning at most once per ``interval`` seconds, with how many were held back.

    One misbehaving guest must not flood the journal.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, kind: str, msg: str, *args) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        if held:
            self.logger.warning(msg + " (and %d more like it since the last warning)", *args, held)
        else:
            self.logger.warning(msg, *args)
