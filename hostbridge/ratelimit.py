"""Rate-limited warnings: how often we say that a guest misbehaves."""

from __future__ import annotations

import logging
import time


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
