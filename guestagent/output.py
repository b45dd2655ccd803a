"""What the ovmd command prints: the original tool's formats, our --json form, and the writer.

Pure formatting (bytes out) plus write_all(), which writes to a file descriptor without Python's
buffered stdout: the CLI exits right after writing, and an unflushed buffer that hits a closed
pipe at interpreter exit produces an "Exception ignored" message we could not catch.

Imports only compactjson, os and time (all cheap): the CLI's fast path uses it.
"""

import os
import time

from ovmproto.compactjson import dumps as _compact_dumps

_ENCODING_ERRORS = "backslashreplace"  # a lone surrogate prints as "\\udcxx", never a traceback


def _dumps(obj):
    # The original printed compact JSON and kept non-ASCII text as it is (UTF-8).
    return _compact_dumps(obj)


def _encode(text):
    return text.encode("utf-8", _ENCODING_ERRORS)


def iso_utc(ts):
    """UNIX seconds as ISO 8601 UTC with microseconds: 2026-11-22T03:04:05.123456Z.

    None for something that is not a time (a daemon bug must not become a traceback here).
    """
    if type(ts) not in (int, float):
        return None
    try:
        # Integer arithmetic on the rounded microseconds: no "...59.1000000" from float rounding.
        secs, frac = divmod(int(round(ts * 1000000)), 1000000)
        return "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)), frac)
    except (OverflowError, ValueError, OSError):
        return None


def pair_line(key, value):
    """`ovmd -l` format: one compact JSON object per line, ``{"foo":"bar"}``."""
    return _encode(_dumps({key: value}) + "\n")


def value_line(value):
    """`ovmd -g` format: the bare value and a newline."""
    return _encode(value + "\n")


def entry_line(entry):
    """--json format of one entry (a dict with key, value, ts, origin as the daemon sends)."""
    obj = {
        "key": entry["key"],
        "value": entry["value"],
        "set": iso_utc(entry.get("ts")),
        "origin": entry.get("origin"),
    }
    return _encode(_dumps(obj) + "\n")


def pair_lines(entries):
    return b"".join(pair_line(e["key"], e["value"]) for e in entries)


def entry_lines(entries):
    return b"".join(entry_line(e) for e in entries)


def write_all(fd, data):
    """Write every byte of ``data`` to ``fd``; OSError (e.g. BrokenPipeError) propagates."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
