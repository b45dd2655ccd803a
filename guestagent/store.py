"""Durable state files: the only I/O behind the cache.

The cache lives in two files in the state directory:

- ``cache.json``, a snapshot of the whole cache, replaced only whole by write_atomic() (a temp
  file fsync'd, renamed over the old one, the rename fsync'd through the directory; a kill -9 at
  any point leaves the old file or the new one, never a mixture);
- ``cache.journal``, the changes made since that snapshot, appended one record per change.

A change is acknowledged only after its record was appended and fdatasync'd, so a change costs one
small write and one flush whatever the size of the cache (rewriting a full cache, 1,024 keys of
8 KB, took 30 ms a change). Deleting is the exception: a delete or a clear rewrites the snapshot
at once, so that the deleted value (often a password a first-boot script has used) leaves the
files then, not at the next compaction. A value replaced by a set stays in the journal until the
next compaction. When the journal has grown as large as the snapshot (and at least
COMPACT_MIN), the cache is written to a new snapshot and the journal starts again empty: each byte
of the cache is rewritten about once per snapshot-size of changes, so compaction costs O(1) per
change on average, and a restart reads at most about twice the cache.

Both files carry a generation: a snapshot names the generation of the journal that continues it,
and the journal's first line says its own. Compaction writes the new snapshot (generation N+1)
first, then a new empty journal N+1; a kill -9 between the two leaves snapshot N+1 with journal
N, which load() recognizes as already folded in and ignores.

A record is one line: the CRC-32 of its JSON in 8 hex digits, a space, the JSON, a newline. Only
the last record can be cut short by a crash (each is flushed before the next is written) and it
was never acknowledged: load() drops it. A bad record followed by good ones is damage, not a
crash: load() keeps the records before it, moves the journal aside for whoever investigates, and
writes a fresh snapshot.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import zlib

from ovmproto import jsonlib
from ovmproto.errors import OvmError
from ovmsys import atomicfile

from .cache import Cache, CacheError, purges

log = logging.getLogger(__name__)

COMPACT_MIN = 1 << 20  # journal bytes before a compaction, however small the snapshot
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


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


def frame(payload: bytes) -> bytes:
    """One journal line: CRC-32 of ``payload`` (8 hex digits), a space, ``payload``, a newline."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def unframe(line: bytes) -> object:
    """The JSON of a journal line without its newline; ValueError when it does not check out."""
    if len(line) < 10 or line[8:9] != b" " or int(line[:8], 16) != zlib.crc32(line[9:]):
        raise ValueError("bad checksum")
    return jsonlib.loads(line[9:])


class CacheStore:
    """The cache's files (``cache.json`` and ``cache.journal`` in the state directory)."""

    FILENAME = "cache.json"
    JOURNAL = "cache.journal"

    def __init__(self, state_dir: str, max_keys: int, max_events: int) -> None:
        self.path = os.path.join(state_dir, self.FILENAME)
        self.journal_path = os.path.join(state_dir, self.JOURNAL)
        self.max_keys = max_keys
        self.max_events = max_events
        self.compactions = 0  # how many snapshots were written (tests and the log)
        self._fd: int | None = None  # the journal, open to append; None: compact before the next
        self._gen = 0  # the generation of the snapshot on disk, and of the journal continuing it
        self._size = 0  # bytes in the journal, all of them whole records
        self._compact_at = COMPACT_MIN

    # -- loading ------------------------------------------------------------------------------

    def load(self) -> Cache:
        """The stored cache (the snapshot plus the journal's changes), or a fresh one.

        A corrupt snapshot (which atomic writes should make impossible, but disks and people
        exist) is moved aside rather than overwritten, so whatever it holds can still be
        recovered; so is a damaged journal.
        """
        self.close()
        for path in (self.path, self.journal_path):
            leftovers = atomicfile.remove_leftovers(path)
            if leftovers:
                # A write cut short by a crash: the file itself is the old one or the new one.
                log.info("removed %d unfinished temp file(s) next to %s", len(leftovers), path)
        cache = self._load_snapshot()
        self._gen = cache.journal or 0
        self._replay(cache)
        return cache

    def _load_snapshot(self) -> Cache:
        data = read(self.path)
        if data is None:
            return Cache(self.max_keys, self.max_events)
        try:
            cache = Cache.from_bytes(data, self.max_keys, self.max_events)
        except CacheError as e:
            aside = self._move_aside(self.path, str(e))
            log.error("%s: %s; moved it to %s and started with an empty cache", self.path, e, aside)
            return Cache(self.max_keys, self.max_events)
        self._compact_at = max(COMPACT_MIN, len(data))
        return cache

    def _replay(self, cache: Cache) -> None:
        """Apply the journal's changes to ``cache`` and open it to append, when it continues the
        snapshot; otherwise leave it closed, so that the first change compacts."""
        data = read(self.journal_path)
        if data is None:
            return
        end = data.find(b"\n")
        try:
            header = unframe(data[:end]) if end >= 0 else None
        except ValueError:
            header = None
        expected = {"journal": self._gen, "gid": cache.gid}
        if header != expected:
            # Most often a journal already folded into the snapshot (a compaction cut short).
            log.info(
                "%s does not continue %s; it is replaced at the next change",
                self.journal_path,
                self.path,
            )
            return
        pos = end + 1
        count = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # the last change, cut short: never acknowledged
            try:
                ops = unframe(data[pos:end])
                if type(ops) is not list:
                    raise ValueError("not a list of ops")
                cache.replay(ops)
            except ValueError:
                break
            pos = end + 1
            count += 1
        if data.find(b"\n", pos) >= 0:
            aside = self._move_aside(self.journal_path, "damaged")
            log.error(
                "%s is damaged after %d changes (byte %d); kept those, moved the file to %s",
                self.journal_path,
                count,
                pos,
                aside,
            )
            self._compact_now(cache)
            return
        if pos < len(data):
            log.info(
                "%s: dropped a change cut short by a crash (never acknowledged)", self.journal_path
            )
        try:
            fd = os.open(self.journal_path, _APPEND)
            if pos < len(data):
                os.ftruncate(fd, pos)
                os.fdatasync(fd)
        except OSError as e:
            log.warning(
                "cannot open %s: %s; writing a new snapshot at the next change",
                self.journal_path,
                e.strerror or e,
            )
            return
        self._fd = fd
        self._size = pos

    def _compact_now(self, cache: Cache) -> None:
        try:
            self.compact(cache)
        except StoreError as e:
            log.error("%s; trying again at the next change", e)

    def _move_aside(self, path: str, why: str) -> str:
        aside = "%s.corrupt-%d" % (path, int(time.time()))
        try:
            os.rename(path, aside)
        except OSError as e2:
            raise StoreError(
                "%s: %s; and cannot move it aside: %s" % (path, why, e2.strerror)
            ) from e2
        return aside

    # -- changing -----------------------------------------------------------------------------

    def commit(self, cache: Cache, ops: list[list[object]]) -> None:
        """Make the change whose ``ops`` were just applied to ``cache`` durable; StoreError when
        it cannot (the files then still hold the cache as it was before the change)."""
        fd = self._fd
        if fd is None or purges(ops):
            self.compact(cache)  # the snapshot holds the change
            return
        record = frame(jsonlib.dumps(ops))
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except OSError as e:
            self._cut_back()
            raise StoreError("cannot write %s: %s" % (self.journal_path, e.strerror or e)) from e
        self._size += len(record)
        if self._size >= self._compact_at:
            try:
                self.compact(cache)
            except StoreError as e:
                # The change is stored (in the journal): only the compaction is put off.
                log.warning("%s; the journal keeps growing until a compaction succeeds", e)
                self._compact_at = self._size + COMPACT_MIN

    def _cut_back(self) -> None:
        """Remove what a failed append may have left after the last whole record."""
        fd = self._fd
        if fd is None:
            return
        try:
            os.ftruncate(fd, self._size)
            os.fdatasync(fd)
        except OSError:
            # The record may still be there: stop appending after it; the next change writes a
            # whole new snapshot from memory instead.
            self.close()

    def compact(self, cache: Cache) -> None:
        """Write ``cache`` whole as the snapshot and start an empty journal after it; StoreError
        when the snapshot cannot be written (the old snapshot and journal then stand)."""
        gen = self._gen + 1
        data = cache.to_bytes(journal=gen)
        write_atomic(self.path, data)
        # From here the snapshot holds every change: the old journal (generation gen - 1) is
        # ignored by load() whatever happens next.
        self.close()
        self._gen = gen
        self.compactions += 1
        self._compact_at = max(COMPACT_MIN, len(data))
        header = frame(jsonlib.dumps({"journal": gen, "gid": cache.gid}))
        try:
            atomicfile.write_atomic(self.journal_path, header)
            fd = os.open(self.journal_path, _APPEND)
        except OSError as e:
            # Nothing lost: the next change writes a snapshot again, and tries again here.
            log.warning("cannot start %s: %s", self.journal_path, e.strerror or e)
            return
        self._fd = fd
        self._size = len(header)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
