"""Durable state files: the only I/O behind the cache.

A change is acknowledged only after write_atomic() returned: the new file is complete and fsync'd,
renamed over the old one, and the rename itself fsync'd through the directory (ovmsys.atomicfile).
A kill -9 at any point leaves either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from ovmproto.errors import OvmError
from ovmsys import atomicfile

from .cache import Cache, CacheError

log = logging.getLogger(__name__)


class StoreError(OvmError):
    code = "internal"


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably (ovmsys.atomicfile); StoreError when it cannot."""
    try:
        atomicfile.write_atomic(path, data)
    except OSError as e:
        raise StoreError("cannot write %s: %s" % (path, e.strerror or e)) from e


def read(path: str) -> bytes | None:
    """The file's bytes, None when there is none. A symlink is refused (ELOOP), never followed:
    the cache must be a file the daemon wrote, not one someone pointed it at."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            return f.read()
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise StoreError("cannot read %s: %s" % (path, e.strerror or e)) from e


class CacheStore:
    """The cache's file (``cache.json`` in the state directory)."""

    FILENAME = "cache.json"

    def __init__(self, state_dir: str, max_keys: int, max_events: int) -> None:
        self.path = os.path.join(state_dir, self.FILENAME)
        self.max_keys = max_keys
        self.max_events = max_events

    def load(self) -> Cache:
        """The stored cache, or a fresh one when there is none.

        A corrupt file (which atomic writes should make impossible, but disks and people exist)
        is moved aside rather than overwritten, so whatever it holds can still be recovered.
        """
        leftovers = atomicfile.remove_leftovers(self.path)
        if leftovers:
            # A write cut short by a crash: the file itself is the old one or the new one.
            log.info("removed %d unfinished temp file(s) next to %s", len(leftovers), self.path)
        data = read(self.path)
        if data is None:
            return Cache(self.max_keys, self.max_events)
        try:
            return Cache.from_bytes(data, self.max_keys, self.max_events)
        except CacheError as e:
            aside = "%s.corrupt-%d" % (self.path, int(time.time()))
            try:
                os.rename(self.path, aside)
            except OSError as e2:
                raise StoreError("%s; and cannot move it aside: %s" % (e, e2.strerror)) from e2
            log.error("%s: %s; moved it to %s and started with an empty cache", self.path, e, aside)
            return Cache(self.max_keys, self.max_events)

    def save(self, cache: Cache) -> None:
        write_atomic(self.path, cache.to_bytes())
