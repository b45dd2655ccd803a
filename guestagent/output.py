"""What the ovmd command prints: the original tool's formats, our --json form, and the writer.

Pure formatting (bytes out) plus write_all(), which writes to a file descriptor without Python's
buffered stdout: the CLI exits right after writing, and an unflushed buffer that hits a closed
pipe at interpreter exit produces an "Exception ignored" message we could not catch.

Imports only compactjson, os and time (all cheap): the CLI's fast path uses it.
"""

from __future__ import annotations

import os
import time

from ovmproto.compactjson import dumps as _compact_dumps

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

_ENCODING_ERRORS = "backslashreplace"  # a lone surrogate prints as "\\udcxx", never a traceback


def _dumps(obj: object) -> str:
    # The original printed compact JSON and kept non-ASCII text as it is (UTF-8).
    return _compact_dumps(obj)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", _ENCODING_ERRORS)


def iso_utc(ts: object) -> str | None:
    """UNIX seconds as ISO 8601 UTC with microseconds: 2026-11-22T03:04:05.123456Z.

    None for something that is not a time (a daemon bug must not become a traceback here).
    """
    if type(ts) is not int and type(ts) is not float:
        return None
    try:
        # Integer arithmetic on the rounded microseconds: no "...59.1000000" from float rounding.
        secs, frac = divmod(round(ts * 1000000), 1000000)
        return "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)), frac)
    except (OverflowError, ValueError, OSError):
        return None


def pair_line(key: str, value: str) -> bytes:
    """`ovmd -l` format: one compact JSON object per line, ``{"foo":"bar"}``."""
    return _encode(_dumps({key: value}) + "\n")


def value_line(value: str) -> bytes:
    """`ovmd -g` format: the bare value and a newline."""
    return _encode(value + "\n")


def entry_line(entry: Mapping[str, Any]) -> bytes:
    """--json format of one entry (a dict with key, value, ts, origin as the daemon sends)."""
    obj = {
        "key": entry["key"],
        "value": entry["value"],
        "set": iso_utc(entry.get("ts")),
        "origin": entry.get("origin"),
    }
    return _encode(_dumps(obj) + "\n")


def pair_lines(entries: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(pair_line(e["key"], e["value"]) for e in entries)


def entry_lines(entries: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(entry_line(e) for e in entries)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``; OSError (e.g. BrokenPipeError) propagates."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
