"""The bridge's copy of one guest's keys, fed by the guest's `changed` frames and `list` answers.

Pure bookkeeping (no I/O): the session feeds it, the store persists what ``take_dirty`` returns.
A quota of keys and bytes bounds what one guest can make the bridge hold.

While its agent is synced, the bridge answers queries from this copy (hostbridge.bridge), so an
entry is never left holding a value the guest has replaced: a change the copy cannot take (over
the quota, or refused by the session) removes the key's entry, and a query then asks the guest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ovmproto.limits import FACTS_PREFIX, check_key
from ovmproto.messages import OP_CLEAR, OP_DEL, OP_SET, ORIGIN_GUEST, ORIGIN_HOST

if TYPE_CHECKING:
    from .store import MirrorRow  # the rows only: the store's I/O stays out of this module


@dataclass
class Entry:
    value: str | None  # None: hidden and loaded from disk (the value was never written there)
    ts: float
    origin: str
    hidden: bool = False

    def __repr__(self) -> str:  # never the value
        return "Entry(size=%s, ts=%r, origin=%r, hidden=%r)" % (
            None if self.value is None else len(self.value),
            self.ts,
            self.origin,
            self.hidden,
        )


def _size(key: str, value: str | None) -> int:
    return len(key) + (len(value) if value is not None else 0)


class Mirror:
    def __init__(self, max_keys: int, max_bytes: int, hidden: set[str] | None = None) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.entries: dict[str, Entry] = {}
        # The keys of entries under FACTS_PREFIX (hostbridge.facts): a VM's facts without a scan.
        self.fact_keys: set[str] = set()
        self.bytes = 0
        self.gid: str | None = None
        self.gseq: int | None = None
        self.hidden: set[str] = set(hidden or ())  # keys the host last sent with log=no
        self.dropped = 0  # keys not mirrored because of the quota
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._unhidden: set[str] = set()
        self._replace = False

    # -- loading and persisting ----------------------------------------------------------------

    def load(self, rows: Iterable[MirrorRow], gid: str | None, gseq: int | None) -> int:
        """Take the rows the store kept; return how many were dropped as illegal keys.

        A database written before guest announcements were checked may hold keys the protocol
        forbids (control characters): they are dropped here and deleted at the next save."""
        dropped = 0
        for r in rows:
            if check_key(r.key) is not None:
                self._deleted.add(r.key)
                dropped += 1
                continue
            self._put(r.key, Entry(r.value, r.ts, r.origin, r.hidden), mark=False)
        self.gid, self.gseq = gid, gseq
        return dropped

    def take_dirty(self) -> tuple[list[tuple[str, Entry]], list[str], list[str], bool]:
        """(rows to write, keys to delete, keys no longer hidden, replace-all) since the last
        call."""
        rows = [(k, self.entries[k]) for k in self._dirty if k in self.entries]
        out = (rows, sorted(self._deleted), sorted(self._unhidden), self._replace)
        self._dirty, self._deleted, self._unhidden, self._replace = set(), set(), set(), False
        return out

    def untake(
        self, keys: Iterable[str], deleted: Iterable[str], unhidden: Iterable[str], replace: bool
    ) -> None:
        """What take_dirty() returned was not saved: mark it dirty again. What changed since
        stays as it is (a key written since is written with its value now)."""
        for key in keys:
            (self._dirty if key in self.entries else self._deleted).add(key)
        self._deleted.update(k for k in deleted if k not in self.entries)
        self._unhidden.update(k for k in unhidden if k not in self.hidden)
        self._replace = self._replace or replace

    @property
    def dirty(self) -> bool:
        return bool(self._dirty or self._deleted or self._unhidden or self._replace)

    # -- host side: secrecy of what we sent ------------------------------------------------------

    def hide(self, key: str) -> None:
        self.hidden.add(key)
        e = self.entries.get(key)
        if e is not None and e.origin == ORIGIN_HOST:
            e.hidden = True
            self._dirty.add(key)

    def unhide(self, key: str) -> None:
        if key in self.hidden:
            self.hidden.discard(key)
            self._unhidden.add(key)
            e = self.entries.get(key)
            if e is not None and e.hidden:
                e.hidden = False
                self._dirty.add(key)

    # -- guest changes --------------------------------------------------------------------------

    def apply(self, op: str, key: str | None, value: str | None, ts: float, origin: str) -> bool:
        """Apply one change; return False when the quota refused it."""
        if op == OP_CLEAR:
            self.entries.clear()
            self.fact_keys.clear()
            self.bytes = 0
            self._dirty.clear()
            self._deleted.clear()
            self._replace = True
            return True
        if key is None:
            return True
        if op == OP_DEL:
            self._remove(key)
            self._deleted.add(key)
            self._dirty.discard(key)
            return True
        if op == OP_SET and value is not None:
            return self._put(key, Entry(value, ts, origin, self._is_hidden(key, origin)))
        return True

    def replace(
        self, items: Iterable[tuple[str, str, float, str]], gid: str | None, gseq: int | None
    ) -> None:
        """A full `list` answer: items are (key, value, ts, origin)."""
        self.entries.clear()
        self.fact_keys.clear()
        self.bytes = 0
        self._dirty.clear()
        self._deleted.clear()
        self._replace = True
        for key, value, ts, origin in items:
            self._put(key, Entry(value, ts, origin, self._is_hidden(key, origin)))
        self.gid, self.gseq = gid, gseq

    def _is_hidden(self, key: str, origin: str) -> bool:
        if key not in self.hidden:
            return False
        if origin == ORIGIN_GUEST:
            # The guest overwrote our secret: what it holds now is its own, not ours.
            self.unhide(key)
            return False
        return True

    def _put(self, key: str, entry: Entry, mark: bool = True) -> bool:
        old = self.entries.get(key)
        grow = _size(key, entry.value) - (_size(key, old.value) if old else 0)
        if (
            old is None and len(self.entries) >= self.max_keys
        ) or self.bytes + grow > self.max_bytes:
            self.dropped += 1
            if old is not None and mark:
                self.discard(key)  # its value is out of date: never answer with it
            return False
        if old is not None:
            del self.entries[key]  # keep set order, as the guest's list does
        self.entries[key] = entry
        if key.startswith(FACTS_PREFIX):
            self.fact_keys.add(key)
        self.bytes += grow
        if mark:
            self._dirty.add(key)
            self._deleted.discard(key)
        return True

    def discard(self, key: str) -> None:
        """Forget ``key`` (the guest changed it in a way the copy cannot hold); saved as deleted."""
        if key in self.entries:
            self._remove(key)
            self._deleted.add(key)
            self._dirty.discard(key)

    def _remove(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= _size(key, old.value)
            self.fact_keys.discard(key)
