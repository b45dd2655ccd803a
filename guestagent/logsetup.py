"""Where the daemon's log goes (-d LEVEL).

    0  off
    1  stderr
    2  the journal (systemd.journal.JournalHandler, when importable and we run under systemd),
       else stderr (under systemd, stderr goes to the journal anyway)

Nothing logged anywhere in guestagent ever contains a value: keys and sizes only. A warning that
may repeat (a bad peer, a failing disk) goes through ovmsys.ratelimit.RateLimitedLog.
"""

from __future__ import annotations

import logging
import os
import sys

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

OFF, STDERR, SYSLOG = 0, 1, 2

_FORMAT_PLAIN = "%(asctime)s ovmd[%(process)d] %(levelname)s %(name)s: %(message)s"
_FORMAT_JOURNAL = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and pid

# Our handlers on the root logger, so a second setup() replaces them.
_installed: list[logging.Handler] = []


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="ovmd")  # untyped package
    return handler


def setup(
    level: int, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler | None:
    """Configure the root logger for debug level 0, 1 or 2; return the handler (or None)."""
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
    del _installed[:]
    if level <= OFF:
        root.setLevel(logging.CRITICAL + 1)
        return None
    handler: logging.Handler | None = None
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
