"""Rate-limited logging of a warning that repeats (a bad peer, a failing disk, a flooding guest).

The first warning of a kind is logged at once; the same kind again within ``interval`` seconds is
only counted, and the next one logged after that says how many were held back. A flood must not
fill the journal, but the first one and a periodic reminder must get through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Warnings through ``logger``, each kind at most once per ``interval`` seconds."""

    __slots__ = ("logger", "interval", "_clock", "_next", "_held")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}  # kind -> when it may be logged again
        self._held: dict[str, int] = {}  # kind -> how many were held back since it was logged

    def warn(self, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` was logged under ``interval`` ago; True if logged."""
        now = self._clock()
        if now < self._next.get(kind, now):
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        held = self._held.pop(kind, 0)
        self._next[kind] = now + self.interval
        if held:
            self.logger.warning(msg + " (and %d more like it since the last warning)", *args, held)
        else:
            self.logger.warning(msg, *args)
        return True

    def reset(self, kind: str) -> None:
        """That failure is over: the next one is news and is logged at once."""
        self._next.pop(kind, None)
        self._held.pop(kind, None)
