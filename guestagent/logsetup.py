"""Where the daemon's log goes (-d LEVEL), and a rate limit for warnings that repeat.

    0  off
    1  stderr
    2  the journal (systemd.journal.JournalHandler, when importable and we run under systemd),
       else stderr (under systemd, stderr goes to the journal anyway)

Nothing logged anywhere in guestagent ever contains a value: keys and sizes only.
"""

import logging
import os
import sys
import time

OFF, STDERR, SYSLOG = 0, 1, 2

_FORMAT_PLAIN = "%(asctime)s ovmd[%(process)d] %(levelname)s %(name)s: %(message)s"
_FORMAT_JOURNAL = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and pid

_installed = []  # our handlers on the root logger, so a second setup() replaces them


def under_systemd(environ=None):
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _journal_handler():
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="ovmd")


def setup(level, stream=None, environ=None):
    """Configure the root logger for debug level 0, 1 or 2; return the handler (or None)."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
    del _installed[:]
    if level <= OFF:
        root.setLevel(logging.CRITICAL + 1)
        return None
    handler = None
    fmt = _FORMAT_PLAIN
    if level >= SYSLOG and under_systemd(environ):
        handler = _journal_handler()
        fmt = _FORMAT_JOURNAL
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _installed.append(handler)
    return handler


class RateLimited:
    """Log a repeating message at most once per ``interval`` seconds, with how many were held back.

    One instance per kind of failure (a bad peer, a failing disk): a flood of the same warning
    must not fill the journal, but the first one and a periodic reminder must get through.
    """

    __slots__ = ("logger", "interval", "clock", "_next", "_suppressed")

    def __init__(self, logger, interval=60.0, clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._next = 0.0
        self._suppressed = 0

    def log(self, level, msg, *args):
        """Log unless one was logged less than ``interval`` ago; True when logged."""
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg = msg + " (and %d more like it held back)"
            args = args + (self._suppressed,)
            self._suppressed = 0
        self._next = now + self.interval
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg, *args):
        return self.log(logging.WARNING, msg, *args)

    def reset(self):
        """The failure is over: the next one is news and logs at once."""
        self._next = 0.0
        self._suppressed = 0
