"""Group commit: the writes of many senders share one SQLite transaction, hence one fsync.

    committer = GroupCommit(store)
    row = await committer.run(lambda db: store.enqueue(vm, key, value, True))

Every send must be durable (synchronous=FULL: an fsync) before it is answered, and before its
outbox row can be written to a guest. One transaction per send makes concurrent senders queue up
behind each other's fsyncs; here a unit of work (a function of the connection, returning what its
sender wants back) waits for the next flush instead, and one flush commits every unit pending.

How a flush goes, and why each step is safe:

- The first unit of a group schedules the flush with ``loop.call_soon``: no timer and no wait for
  company. The units that arrive while the loop is busy (with the previous fsync, or with other
  requests of the same iteration) form the next group, so grouping grows with the load by itself
  and a lone sender pays nothing but one turn of the loop.
- The flush is one synchronous callback: BEGIN IMMEDIATE, every unit in submission order, COMMIT.
  Nothing else runs on the loop meanwhile, so no other code (a guest's delivery reading the
  outbox, an API request reading the audit) can see a row before its COMMIT returned: a row is
  never written to a guest before it is durable, and submission order is seq order.
- Each unit runs in its own SAVEPOINT: one that raises (an unknown VM, a constraint) is rolled back
  alone and its sender gets its exception; the others commit.
- A sender's future is resolved only after COMMIT returned, so nothing is answered ("queued",
  "delivered") before it is durable. When BEGIN or COMMIT fails, no unit of the group is
  committed, and every unit's sender gets a BridgeError naming the cause.
- A unit whose sender gave up (its future cancelled, e.g. the client went away) before the flush
  is skipped: nothing was kept and nothing was answered.

On the pool's PostgreSQL store (hostbridge.pgstore) every round trip would stop the loop while
the database works (a third of a send's time, measured). So there:

- A group whose units are all Preparable (a send's enqueue, a delivery's removal: the hot path)
  commits beside the loop. Each unit's one write is made on the loop (prepare: its statement and
  parameters, in submission order), then the store's commit thread sends BEGIN, the statements
  and COMMIT in one pipeline, one round trip, on a connection of its own, while the loop goes on
  serving requests. Units arriving meanwhile form the next group, which starts when this one has
  landed: groups still commit one after the other, in order. Landing (back on the loop) turns
  each statement's row into its unit's result and answers the senders, so nothing is answered
  before it is durable, as above. Every other call of the store first waits for the group in
  flight to commit (PgStore.settle), so the database sees the order of operations it would see
  with the flush on the loop; and no other connection sees the group's rows before its COMMIT.
  When a statement fails, none of the group is kept, and its units run again on the loop, each
  in its savepoint, as below. A sender who gives up while its group is in flight is not
  answered, though its write may be kept (as when its connection breaks after the answer).
- Any other group runs on the loop as above, but a group of one unit with no transaction around
  it (PgStore.alone()): a unit makes one write at most, after its reads, and that write is one
  statement that commits by itself; BEGIN and COMMIT would cost a second round trip and twice
  the client's CPU.

``enabled=False`` runs each unit at once in a transaction of its own, as before group commits (a
switch for measurements: HOSTBRIDGE_GROUP_COMMIT=0 in the bridge's environment, bench/sends.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from .errors import BridgeError, StoreUnavailable
from .store import PreparedWrite, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set to "0" to commit each unit alone (bench/sends.py compares both).
ENVIRONMENT_SWITCH = "HOSTBRIDGE_GROUP_COMMIT"


def enabled_by_environment() -> bool:
    return os.environ.get(ENVIRONMENT_SWITCH, "1").strip() != "0"


class CommitFailed(BridgeError):
    """The group's transaction could not be committed: nothing of it is in the database."""


class Preparable(Generic[T]):
    """A unit whose one write can also be made ready on the loop and committed beside it, with
    its group, on the pool's commit thread (PgStore.run_prepared): ``run`` is the unit as any
    other (the group's way on SQLite, and when its group must run again unit by unit);
    ``prepare`` makes its write, whose result, once committed, is the unit's. ``prepare`` may
    raise (errors.Fenced): its sender gets that, and nothing is written."""

    def __init__(self, run: Callable[[Any], T], prepare: Callable[[], PreparedWrite]) -> None:
        self.run = run
        self.prepare = prepare

    def __call__(self, db: Any) -> T:
        return self.run(db)


# Units with their senders' futures, in submission order.
_Unit = Callable[[Any], Any]
_Group = list[tuple[_Unit, "asyncio.Future[Any]"]]


class GroupCommit:
    def __init__(self, store: Store, enabled: bool = True, max_units: int | None = None) -> None:
        self.store = store
        self.enabled = enabled
        # At most this many units a transaction (None: all pending). The pool's PostgreSQL
        # store takes 60: each unit is a subtransaction, and past 64 in one transaction the
        # server's subtransaction cache overflows, which slows every other session meanwhile.
        self.max_units = max_units
        self._pending: _Group = []
        self._scheduled = False
        # The group committing beside the loop (PgStore.run_prepared): its units, their writes
        # and the commit thread's future. One at a time: units arriving meanwhile wait for it.
        self._inflight: tuple[_Group, list[PreparedWrite], concurrent.futures.Future[Any]] | None
        self._inflight = None
        # Transactions committed, and the units they held (units / commits: how many writes
        # each fsync served); failed: transactions whose BEGIN or COMMIT failed.
        self.commits = 0
        self.units = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        """Units waiting for the next flush."""
        return len(self._pending)

    def submit(self, unit: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """A future for ``unit(db)``'s result, resolved once its transaction has committed.

        ``unit`` runs inside a savepoint and must not yield (it is a plain function); it may call
        the store's own methods, whose transactions become savepoints within the group's.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((unit, fut))
        if not self.enabled:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_soon)
        return fut

    async def run(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """``unit(db)``'s result once committed; its exception when it raised or the commit
        failed (CommitFailed)."""
        return await self.submit(unit)

    def flush(self) -> None:
        """Commit every pending unit now, in one transaction, or one per max_units units, after
        the group committing beside the loop, if any (the bridge calls it at stop too)."""
        self._scheduled = False
        self._land()
        self._flush(wait=True)

    def _flush_soon(self) -> None:
        self._scheduled = False
        if self._inflight is None:  # else its landing flushes what came meanwhile
            self._flush(wait=False)

    def _flush(self, wait: bool) -> None:
        pending = [(unit, fut) for unit, fut in self._pending if not fut.cancelled()]
        self._pending = []
        size = self.max_units or len(pending) or 1
        run_prepared = getattr(self.store, "run_prepared", None)
        while pending:
            group, pending = pending[:size], pending[size:]
            if run_prepared is None or not all(isinstance(u, Preparable) for u, _ in group):
                self._commit(group)
                continue
            self._start(run_prepared, group)
            if not wait and self._inflight is not None:
                self._pending = pending + self._pending  # after this group, in their order
                return
            self._land()

    def _start(
        self,
        run_prepared: Callable[[list[PreparedWrite]], concurrent.futures.Future[Any]],
        group: _Group,
    ) -> None:
        """Prepare each unit's write and commit them beside the loop; _landed() answers."""
        live: _Group = []
        writes: list[PreparedWrite] = []
        for unit, fut in group:
            assert isinstance(unit, Preparable)
            try:
                writes.append(unit.prepare())
            except Exception as e:  # noqa: BLE001 - the unit's sender gets it; nothing written
                if not fut.done():
                    fut.set_exception(e)
                continue
            live.append((unit, fut))
        if not live:
            return
        done = run_prepared(writes)
        self._inflight = (live, writes, done)
        loop = asyncio.get_running_loop()
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(self._landed, done))

    def _landed(self, done: concurrent.futures.Future[Any]) -> None:
        if self._inflight is None or self._inflight[2] is not done:
            return  # flush() landed it already
        self._land()
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _land(self) -> None:
        """Wait for the group committing beside the loop, if any, and answer its senders. A
        sender who gave up meanwhile is not answered, though its write may be kept (as when
        its connection breaks after the answer was sent)."""
        if self._inflight is None:
            return
        live, writes, done = self._inflight
        self._inflight = None
        concurrent.futures.wait([done])
        try:
            rows = done.result()
        except StoreUnavailable as e:
            self._fail(live, e)
            return
        except Exception as e:  # noqa: BLE001 - a statement failed: none of the group is kept
            log.debug("a group of %d failed (%s): each unit again, alone", len(live), e)
            self._commit(live)
            return
        outcomes: list[tuple[bool, Any]] = []
        for w, row in zip(writes, rows):
            try:
                outcomes.append((True, w.result(row)))
            except Exception as e:  # noqa: BLE001 - the unit's sender gets it (errors.Fenced)
                outcomes.append((False, e))
        self._answer(live, outcomes)

    def _commit(self, group: _Group) -> None:
        alone = getattr(self.store, "alone", None)
        if alone is not None and len(group) == 1:
            self._commit_alone(alone, group)
            return
        if getattr(self.store, "optimistic_groups", False):
            if self._commit_optimistic(group):
                return
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.store.batch() as db:
                for unit, _ in group:
                    try:
                        with self.store.savepoint():
                            outcomes.append((True, unit(db)))
                    except Exception as e:  # noqa: BLE001 - the unit's sender gets it
                        outcomes.append((False, e))
        except BaseException as e:
            self._fail(group, e)
            if not isinstance(e, Exception):
                raise
            return
        self._answer(group, outcomes)

    def _fail(self, group: _Group, e: BaseException) -> None:
        """BEGIN or COMMIT failed: no unit of ``group`` is kept; each sender hears why."""
        self.failed += 1
        log.error("cannot commit %d write(s) to the database: %s", len(group), e)
        for _, fut in group:
            if fut.done():
                continue
            failure: BridgeError
            if isinstance(e, StoreUnavailable):
                # Its own code (store_unavailable: HTTP 503, exit 3): try again later.
                failure = StoreUnavailable(e.message)
            else:
                failure = CommitFailed("cannot commit to the bridge's database: %s" % e)
            failure.__cause__ = e
            fut.set_exception(failure)

    def _commit_alone(
        self,
        alone: Callable[[], AbstractContextManager[None]],
        group: _Group,
    ) -> None:
        """A group of one unit on the pool's database: its one write commits by itself, with
        no transaction around it (PgStore.alone()). Units make one write at most (an enqueue,
        a finish, an audit row), after reads."""
        ((unit, _),) = group
        try:
            with alone():
                outcome = (True, unit(None))
        except StoreUnavailable as e:
            self._fail(group, e)
            return
        except Exception as e:  # noqa: BLE001 - the unit's sender gets it; nothing was kept
            outcome = (False, e)
        self._answer(group, [outcome])

    def _commit_optimistic(self, group: _Group) -> bool:
        """The group in one transaction without a savepoint per unit (on the pool's database, a
        savepoint and its release are two round trips a unit); True when it committed, or
        failed as a whole (its senders told). When a unit raised, nothing of the group is kept
        and False says to run it again unit by unit, each in its savepoint (units are plain
        functions of the database: running one again after a rollback is running it once)."""
        try:
            with self.store.batch(savepoints=False) as db:
                values = [unit(db) for unit, _ in group]
        except StoreUnavailable as e:
            self._fail(group, e)
            return True
        except Exception:  # noqa: BLE001 - a unit's own failure: isolate it (the caller)
            return False
        self._answer(group, [(True, value) for value in values])
        return True

    def _answer(
        self,
        group: _Group,
        outcomes: list[tuple[bool, Any]],
    ) -> None:
        self.commits += 1
        self.units += sum(1 for ok, _ in outcomes if ok)
        for (_, fut), (ok, value) in zip(group, outcomes):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
