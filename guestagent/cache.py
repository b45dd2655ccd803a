"""The guest's key/value cache: entries, quota, change counter, host sequence position, events.

Pure logic: no I/O and no clock (callers pass ``ts``, UNIX seconds). store.py makes it durable.
Every method that raises leaves the cache exactly as it was, so a refused request changes nothing.

Between begin() and end() the cache records what each change did to its state as "ops", small
JSON-able lists (_SET and the others below); store.py appends them to its journal, and replay()
applies them again when the journal is read back. An op says what happened, not what was asked:
replaying it never validates or checks a quota, so a change acknowledged under one limit
survives a restart under a lower one.
"""

from __future__ import annotations

import binascii
import os
from collections import deque

from ovmproto import jsonlib
from ovmproto.errors import OvmError
from ovmproto.limits import DEFAULT_MAX_KEYS, EVENT_KEY, check_key, check_value
from ovmproto.messages import OP_CLEAR, OP_DEL, OP_SET, ORIGIN_HOST, ORIGINS, Changed

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

FORMAT = 1  # version of the file layout written by to_bytes
# The journal's ops (replay()), each a list headed by one of these. Short: every change writes one.
_SET = "s"  # [_SET, key, value, ts, origin]: the key set (moved to the end of the order)
_DEL = "d"  # [_DEL, key]
_CLEAR = "c"  # [_CLEAR]: every key deleted
_EVENT = "e"  # [_EVENT, value, ts]: a VMAPIEvent appended (the oldest dropped when full)
_EPOCH = "p"  # [_EPOCH, epoch]: a new host stream followed (hseq back to 0)
_HSEQ = "h"  # [_HSEQ, seq]: host message seq applied
DEFAULT_MAX_EVENTS = 64


class CacheError(OvmError):
    """A request the cache refuses; ``code`` is an error code of docs/protocol.md."""


class Entry:
    __slots__ = ("key", "value", "ts", "origin")

    def __init__(self, key: str, value: str, ts: float, origin: str) -> None:
        self.key = key
        self.value = value
        self.ts = ts
        self.origin = origin

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and (self.key, self.value, self.ts, self.origin) == (
            other.key,
            other.value,
            other.ts,
            other.origin,
        )

    __hash__ = None  # type: ignore[assignment]  # unhashable (mutable, equal by value), as list

    def __repr__(self) -> str:  # never the value: it may be a password
        return "Entry(key=%r, value=<%d chars>, ts=%r, origin=%r)" % (
            self.key,
            len(self.value),
            self.ts,
            self.origin,
        )


def _new_gid() -> str:
    return binascii.hexlify(os.urandom(8)).decode("ascii")


def _validate(key: str, value: str | None) -> None:
    problem = check_key(key) or (check_value(value) if value is not None else None)
    if problem:
        raise CacheError(problem[1], problem[0])


def purges(ops: Sequence[Sequence[object]]) -> bool:
    """True when ``ops`` delete a value: the store must then rewrite its files rather than
    append, so that the value (perhaps a password a first-boot script just used) leaves them."""
    return any(op[0] == _DEL or op[0] == _CLEAR for op in ops)


def _valid_op(op: object) -> bool:
    if type(op) is not list or not op:
        return False
    kind, n = op[0], len(op)
    if kind == _SET:
        return (
            n == 5
            and type(op[1]) is str
            and type(op[2]) is str
            and type(op[3]) in (int, float)
            and op[4] in ORIGINS
        )
    if kind == _DEL or kind == _EPOCH:
        return n == 2 and type(op[1]) is str
    if kind == _CLEAR:
        return n == 1
    if kind == _EVENT:
        return n == 3 and type(op[1]) is str and type(op[2]) in (int, float)
    if kind == _HSEQ:
        return n == 2 and type(op[1]) is int
    return False


class Cache:
    def __init__(
        self,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_events: int = DEFAULT_MAX_EVENTS,
        gid: str | None = None,
    ) -> None:
        self.max_keys = max_keys
        self.gid = gid or _new_gid()  # a fresh identity tells the host its mirror is void
        self.gseq = 0  # counts every change, of any origin
        self.epoch: str | None = None  # the host stream we follow
        self.hseq = 0  # the last host seq applied in that epoch
        # A dict keeps insertion order; re-setting a key pops and re-inserts it, so iteration
        # order is the order keys were (last) set, which is what `ovmd -l` prints.
        self._entries: dict[str, Entry] = {}
        self._events: deque[Entry] = deque(maxlen=max_events)
        self._ops: list[list[object]] | None = None  # recording between begin() and end()
        self.journal: int | None = None  # from_bytes: the generation of journal that follows

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def events(self) -> list[Entry]:
        return list(self._events)

    # -- changes of any origin ----------------------------------------------------------------

    def set(self, key: str, value: str, origin: str, ts: float) -> Changed:
        _validate(key, value)
        self._check_quota([key])
        return self._store(key, value, origin, ts)

    def put(self, items: Sequence[Sequence[str]], origin: str, ts: float) -> list[Changed]:
        """Set several keys, all or none."""
        if not items:
            raise CacheError("nothing to set", "bad_request")
        for key, value in items:
            _validate(key, value)
        self._check_quota([k for k, _ in items])
        return [self._store(key, value, origin, ts) for key, value in items]

    def delete(self, key: str, origin: str, ts: float) -> Changed | None:
        if self._entries.pop(key, None) is None:
            return None
        self._record(_DEL, key)
        return self._changed(OP_DEL, origin, ts, key=key)

    def clear(self, origin: str, ts: float) -> Changed | None:
        if not self._entries:
            return None
        self._entries.clear()
        self._record(_CLEAR)
        return self._changed(OP_CLEAR, origin, ts)

    def add_event(self, value: str, ts: float) -> None:
        problem = check_value(value)
        if problem:
            raise CacheError(problem[1], problem[0])
        self._events.append(Entry(EVENT_KEY, value, ts, ORIGIN_HOST))
        self._record(_EVENT, value, ts)

    # -- host messages: exactly once, in order ------------------------------------------------

    def follow_epoch(self, epoch: str) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.hseq = 0
            self._record(_EPOCH, epoch)

    def is_duplicate(self, seq: int) -> bool:
        return seq <= self.hseq

    def apply_host_set(self, seq: int, key: str, value: str, ts: float) -> Changed | None:
        """Apply a host set; a VMAPIEvent becomes an event. Records seq as applied."""
        if key == EVENT_KEY:
            self.add_event(value, ts)
            self._applied(seq)
            return None
        change = self.set(key, value, ORIGIN_HOST, ts)
        self._applied(seq)
        return change

    def apply_host_delete(self, seq: int, key: str, ts: float) -> Changed | None:
        change = self.delete(key, ORIGIN_HOST, ts)
        self._applied(seq)
        return change

    def _applied(self, seq: int) -> None:
        self.hseq = seq
        self._record(_HSEQ, seq)

    # -- the journal's ops --------------------------------------------------------------------

    def begin(self) -> None:
        """Record the ops of the changes that follow, until end()."""
        self._ops = []

    def end(self) -> list[list[object]]:
        """Stop recording; the ops recorded since begin() (empty: nothing changed)."""
        ops, self._ops = self._ops or [], None
        return ops

    def replay(self, ops: Sequence[Sequence[object]]) -> None:
        """Apply ops recorded by begin()/end(), as read back from the journal. ValueError, with
        nothing applied, when an op is not one this version writes (the journal is then damaged or
        not ours): a change is replayed whole or not at all."""
        for op in ops:
            if not _valid_op(op):
                raise ValueError("bad op in the journal")
        entries = self._entries
        for op in ops:
            kind = op[0]
            if kind == _SET:
                key = str(op[1])
                entries.pop(key, None)
                entries[key] = Entry(key, str(op[2]), float(op[3]), str(op[4]))  # type: ignore[arg-type]
                self.gseq += 1
            elif kind == _DEL:
                entries.pop(str(op[1]), None)
                self.gseq += 1
            elif kind == _CLEAR:
                entries.clear()
                self.gseq += 1
            elif kind == _EVENT:
                self._events.append(Entry(EVENT_KEY, str(op[1]), float(op[2]), ORIGIN_HOST))  # type: ignore[arg-type]
            elif kind == _EPOCH:
                self.epoch, self.hseq = str(op[1]), 0
            else:  # _HSEQ
                self.hseq = int(op[1])  # type: ignore[call-overload]

    def _record(self, *op: object) -> None:
        if self._ops is not None:
            self._ops.append(list(op))

    # -- persistence --------------------------------------------------------------------------

    def to_bytes(self, journal: int | None = None) -> bytes:
        """The whole cache; ``journal``: the generation of the journal that continues it."""
        return jsonlib.dumps(
            {
                "format": FORMAT,
                "journal": journal,
                "gid": self.gid,
                "gseq": self.gseq,
                "epoch": self.epoch,
                "hseq": self.hseq,
                "entries": [[e.key, e.value, e.ts, e.origin] for e in self._entries.values()],
                "events": [[e.value, e.ts] for e in self._events],
            }
        )

    @classmethod
    def from_bytes(
        cls, data: bytes, max_keys: int = DEFAULT_MAX_KEYS, max_events: int = DEFAULT_MAX_EVENTS
    ) -> Cache:
        """Rebuild a cache from to_bytes() output; raise CacheError(code "corrupt") on bad data.

        Entries over the current limits are still loaded (a lowered max_keys must not destroy
        data that was acknowledged); only new keys are refused until the cache shrinks.
        """
        try:
            obj = jsonlib.loads(data)
            if obj.get("format") != FORMAT:
                raise ValueError("unknown format %r" % (obj.get("format"),))
            cache = cls(max_keys, max_events, gid=str(obj["gid"]))
            cache.gseq = int(obj["gseq"])
            cache.epoch = obj["epoch"] if obj["epoch"] is None else str(obj["epoch"])
            cache.hseq = int(obj["hseq"])
            journal = obj.get("journal")  # absent in files written before the journal existed
            cache.journal = None if journal is None else int(journal)
            for key, value, ts, origin in obj["entries"]:
                if type(key) is not str or type(value) is not str or origin not in ORIGINS:
                    raise ValueError("bad entry")
                cache._entries[key] = Entry(key, value, float(ts), origin)
            for value, ts in obj["events"]:
                if type(value) is not str:
                    raise ValueError("bad event")
                cache._events.append(Entry(EVENT_KEY, value, float(ts), ORIGIN_HOST))
        except (ValueError, KeyError, TypeError, AttributeError, jsonlib.JSONDecodeError) as e:
            raise CacheError(
                "cache file is corrupt: %s" % (str(e).splitlines() or ["?"])[0], "corrupt"
            ) from None
        return cache

    # -- internals ----------------------------------------------------------------------------

    def _check_quota(self, keys: Iterable[str]) -> None:
        new = len({k for k in keys if k not in self._entries})
        if new and len(self._entries) + new > self.max_keys:
            raise CacheError(
                "the cache holds %d keys, the limit is %d keys"
                % (len(self._entries), self.max_keys),
                "quota",
            )

    def _store(self, key: str, value: str, origin: str, ts: float) -> Changed:
        self._entries.pop(key, None)
        self._entries[key] = Entry(key, value, ts, origin)
        self._record(_SET, key, value, ts, origin)
        return self._changed(OP_SET, origin, ts, key=key, value=value)

    def _changed(
        self, op: str, origin: str, ts: float, key: str | None = None, value: str | None = None
    ) -> Changed:
        self.gseq += 1
        return Changed(gseq=self.gseq, op=op, ts=ts, origin=origin, key=key, value=value)
