"""The cache operations that the host link and the local server share.

Every change goes: validate and apply (Cache raises CacheError and stays unchanged), store
(CacheStore.commit appends it to the journal), then tell the listeners (the host link sends
``changed``) and wake the waiters. If storing fails the cache is read back from its files, which
hold it as it was before the change, and ServiceError("internal") is raised: nothing is
acknowledged unless it is on disk.

Also the reply frames both peers build the same way (list_frames, error_reply).

No I/O besides the store, no event loop: callers own timeouts and sockets.
"""

from __future__ import annotations

import logging
import time

from ovmproto.codec import encode
from ovmproto.errors import OvmError
from ovmproto.limits import EVENT_KEY, FACTS_PREFIX
from ovmproto.messages import ORIGIN_GUEST, Changed, Err, Item, Ok
from ovmsys.ratelimit import RateLimitedLog

from . import __version__
from .cache import Cache, Entry
from .store import CacheStore, StoreError

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import TypeVar

    _R = TypeVar("_R")

log = logging.getLogger(__name__)

AGENT = "ovmd " + __version__  # what a hello reply says we are


class ServiceError(OvmError):
    """A request failed for a reason that is not the requester's fault (code "internal")."""

    code = "internal"


class ReservedKey(OvmError):
    """A set of a key under FACTS_PREFIX by anyone but the agent itself (docs/cli.md)."""

    code = "denied"


def refuse_reserved(keys: Iterable[object]) -> None:
    """Raise ReservedKey when one of ``keys`` is under FACTS_PREFIX: the guest facts are the
    agent's own, so that the host can trust them to come from it (a delete is allowed: the
    agent publishes the fact again)."""
    for key in keys:
        if isinstance(key, str) and key.startswith(FACTS_PREFIX):
            raise ReservedKey(
                "keys under %s are the agent's own guest facts and cannot be set" % FACTS_PREFIX
            )


class Waiter:
    """A pending ``wait``: ``callback(entry)`` runs once when ``key`` is next set."""

    __slots__ = ("key", "callback", "_service")

    def __init__(self, service: Service, key: str, callback: Callable[[Entry], object]) -> None:
        self._service: Service | None = service
        self.key = key
        self.callback = callback

    def cancel(self) -> None:
        if self._service is not None:
            self._service._drop_waiter(self)
            self._service = None


class Service:
    def __init__(self, store: CacheStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.cache = store.load()
        self._listeners: list[Callable[[Changed], object]] = []
        self._waiters: dict[str, list[Waiter]] = {}  # key -> [Waiter]
        self._warn = RateLimitedLog(log)

    # -- observers ----------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[Changed], object]) -> None:
        """``callback(changed)`` for every change of the cache, after it is stored."""
        self._listeners.append(callback)

    def wait(
        self, key: str, callback: Callable[[Entry], object], changed: bool = False
    ) -> Entry | Waiter:
        """Return the current entry when ``key`` exists (unless ``changed``), else a Waiter whose
        callback gets the entry when the key is next set. For VMAPIEvent: the latest event."""
        if not changed:
            entry = self.current(key)
            if entry is not None:
                return entry
        waiter = Waiter(self, key, callback)
        self._waiters.setdefault(key, []).append(waiter)
        return waiter

    def _drop_waiter(self, waiter: Waiter) -> None:
        waiters = self._waiters.get(waiter.key)
        if waiters:
            try:
                waiters.remove(waiter)
            except ValueError:
                pass  # already woken
            if not waiters:
                del self._waiters[waiter.key]

    def _wake(self, key: str, entry: Entry) -> None:
        waiters = self._waiters.pop(key, None)
        if waiters:
            for waiter in waiters:
                waiter._service = None
                waiter.callback(entry)

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self.cache.get(key)

    def current(self, key: str) -> Entry | None:
        if key == EVENT_KEY:
            events = self.cache.events()
            return events[-1] if events else None
        return self.cache.get(key)

    def entries(self) -> list[Entry]:
        return self.cache.entries()

    def events(self) -> list[Entry]:
        return self.cache.events()

    # -- changes ------------------------------------------------------------------------------

    def _commit(self, apply: Callable[[Cache], _R]) -> _R:
        """Run ``apply(cache)`` and store the change, or undo it and raise ServiceError."""
        cache = self.cache
        cache.begin()
        try:
            result = apply(cache)  # CacheError leaves the cache unchanged
        finally:
            ops = cache.end()
        if not ops:
            return result
        try:
            self.store.commit(cache, ops)
        except StoreError as e:
            self._warn.warn("save", "%s; the change was refused", e)
            self._undo()
            raise ServiceError("could not store the cache; nothing was changed") from None
        self._warn.reset("save")
        return result

    def _undo(self) -> None:
        # The files hold the cache as it was before the failed change (the store cut back what
        # the append may have left): reading them back is the undo. It costs a read of the whole
        # cache, but only when the disk fails, where keeping a copy would cost on every change.
        try:
            self.cache = self.store.load()
        except StoreError as e:
            # The disk fails reads too. Keep the cache in memory as it is, the refused change in
            # it; the store writes it whole at the next change (the journal is closed).
            self.store.close()
            log.error("%s; cannot reread the cache after a failed write", e)

    def _announce(self, changes: Iterable[Changed | None]) -> None:
        for change in changes:
            if change is None:
                continue
            for listener in self._listeners:
                listener(change)
            if change.key is not None and change.op == "set" and change.key in self._waiters:
                entry = self.cache.get(change.key)
                if entry is not None:  # always: the key was just set
                    self._wake(change.key, entry)

    def _announce_event(self) -> None:
        if EVENT_KEY in self._waiters:
            entry = self.current(EVENT_KEY)
            if entry is not None:  # always: an event was just added
                self._wake(EVENT_KEY, entry)

    def set(self, key: str, value: str, origin: str) -> Changed:
        refuse_reserved((key,))
        ts = self.clock()
        change = self._commit(lambda c: c.set(key, value, origin, ts))
        self._announce((change,))
        return change

    def put(self, items: Sequence[Sequence[str]], origin: str) -> list[Changed]:
        refuse_reserved(item[0] for item in items if item)
        ts = self.clock()
        changes = self._commit(lambda c: c.put(items, origin, ts))
        self._announce(changes)
        return changes

    def delete(self, key: str, origin: str) -> Changed | None:
        """The change, or None when the key did not exist (nothing stored then)."""
        if self.cache.get(key) is None:
            return None
        ts = self.clock()
        change = self._commit(lambda c: c.delete(key, origin, ts))
        self._announce((change,))
        return change

    def clear(self, origin: str) -> Changed | None:
        if not len(self.cache):
            return None
        ts = self.clock()
        change = self._commit(lambda c: c.clear(origin, ts))
        self._announce((change,))
        return change

    def publish(self, sets: Sequence[Sequence[str]], deletes: Sequence[str]) -> list[Changed]:
        """The agent's own change of its facts (guestagent.factwatch): set ``sets`` and delete
        ``deletes`` with origin guest, all in one stored change, under FACTS_PREFIX only."""
        for key in [item[0] for item in sets] + list(deletes):
            if not key.startswith(FACTS_PREFIX):
                raise ValueError("publish() is for keys under %s" % FACTS_PREFIX)
        if not sets and not deletes:
            return []
        ts = self.clock()

        def apply(cache: Cache) -> list[Changed | None]:
            out: list[Changed | None] = list(cache.put(sets, ORIGIN_GUEST, ts)) if sets else []
            out.extend(cache.delete(key, ORIGIN_GUEST, ts) for key in deletes)
            return out

        changes = self._commit(apply)
        self._announce(changes)
        return [c for c in changes if c is not None]

    def post_event(self, value: str) -> None:
        ts = self.clock()
        self._commit(lambda c: c.add_event(value, ts))
        self._announce_event()

    # -- host messages, exactly once --------------------------------------------------------

    def follow_epoch(self, epoch: str) -> None:
        """Follow the host stream ``epoch`` (a new one restarts hseq at 0); stored at once."""
        if epoch != self.cache.epoch:
            self._commit(lambda c: c.follow_epoch(epoch))

    def host_set(self, seq: int | None, key: str, value: str) -> bool:
        """Apply a host set; True when ``seq`` was already applied (nothing done then).

        Without a seq (a host tool that does not number its messages) it is applied as is.
        """
        if seq is not None and self.cache.is_duplicate(seq):
            return True
        refuse_reserved((key,))
        ts = self.clock()
        if seq is None:
            if key == EVENT_KEY:
                self._commit(lambda c: c.add_event(value, ts))
                self._announce_event()
            else:
                self._announce((self._commit(lambda c: c.set(key, value, "host", ts)),))
            return False
        change = self._commit(lambda c: c.apply_host_set(seq, key, value, ts))
        if change is None:
            self._announce_event()
        else:
            self._announce((change,))
        return False

    def host_delete(self, seq: int | None, key: str) -> tuple[bool, bool]:
        """Apply a host del; return (duplicate, found)."""
        if seq is not None and self.cache.is_duplicate(seq):
            return True, False
        if seq is None:
            return False, self.delete(key, "host") is not None
        ts = self.clock()
        change = self._commit(lambda c: c.apply_host_delete(seq, key, ts))
        self._announce((change,))
        return False, change is not None


def list_frames(
    request_id: int, entries: Sequence[Entry], gseq: int | None = None
) -> Iterator[bytes]:
    """The frames answering a list (or events) request: one Item per entry, then Ok(count).

    A generator: encoded only as the peer reads, so a full cache is never held twice. ``entries``
    is a snapshot, and ``gseq`` the change counter it reflects (taken at the same moment, as
    arguments are): the host replays only the changes after it onto the listing.
    """
    for e in entries:
        yield encode(Item(id=request_id, key=e.key, value=e.value, ts=e.ts, origin=e.origin))
    yield encode(Ok(id=request_id, count=len(entries), gseq=gseq))


def ok_frame(request_id: int) -> bytes:
    """The frame of a bare Ok: what encode(Ok(id=...)) gives, without building the message (the
    ping round trip is the path the agent is measured on)."""
    return b'{"t":"ok","id":%d}\n' % request_id


def error_reply(request_id: int | None, err: OvmError) -> bytes:
    """The Err frame for an OvmError (its one-line text never holds a value)."""
    return encode(Err(id=request_id, code=err.code, msg=err.message))
