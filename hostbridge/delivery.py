"""One guest's outbox, delivered in order and exactly once, whenever its link is synced.

The outbox rows live in the store (fsync'd before a send is answered). Each is sent as a
sequenced `set` or `del` and removed when the guest acknowledges it. Exactly once needs no
acknowledgement bookkeeping of our own: the guest keeps the last host seq it applied (hseq, per
epoch) and drops a seq it has already applied, and its hello answer tells us that hseq, so every
row up to it counts as delivered even when its acknowledgement was lost with the link.

A sender waiting for its message (``wait``) is woken with the outcome: delivered, refused by the
guest (GuestError), withdrawn (MessageCancelled, MessageExpired), or LinkReset when the link goes
down first.

Withdrawing (withdraw(): a cancel, or an expiry) and delivering never overlap: both run on the
event loop's thread, and _deliver reads a row, marks it written and writes it to the channel
without yielding in between. So a row is either withdrawn before it was written (deleted, never
written) or after (the guest may hold it: it stays, valueless and marked, until the guest's
acknowledgement or next hello says "delivered" after all, or else it ends withdrawn).

Acknowledged rows are removed through the bridge's group committer (hostbridge.groupcommit), so
that the acknowledgements of many guests, and the sends arriving meanwhile, share one fsync. When
the sender of a row is answered, and when the next row is read, is reasoned out at _acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from ovmproto.handshake import HelloResult
from ovmproto.messages import Delete, Set

from . import errors
from .errors import GuestError, LinkReset, MessageCancelled, MessageExpired
from .groupcommit import GroupCommit, Preparable
from .mirror import Mirror
from .session import Session, State
from .store import OutboxRow, PreparedWrite, Store
from .tasks import TaskSet

# The next rows to deliver, read with an outcome, and the token they were read under.
_Ahead = tuple[tuple[int, int | None], list[OutboxRow]]


def _ignore_outcome(seq: int, outcome: str, row: OutboxRow | None) -> None:
    pass


def _request_for(row: OutboxRow) -> Callable[[int], Set | Delete]:
    if row.value is None:
        return lambda i: Delete(id=i, key=row.key, seq=row.seq)
    value = row.value
    return lambda i: Set(id=i, key=row.key, value=value, seq=row.seq)


class Delivery:
    def __init__(
        self,
        session: Session,
        store: Store,
        mirror: Mirror,
        epoch: str,
        timeout: float,
        tasks: TaskSet,
    ) -> None:
        self.session = session
        self.store = store
        self.mirror = mirror
        self.epoch = epoch  # the host stream this outbox's seqs belong to
        self.timeout = timeout
        self._tasks = tasks
        self._wake = asyncio.Event()
        # seq -> the senders waiting for its ack: the first, and any retry of it (idempotency key)
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        # The highest seq written to the guest (it may have it). At start the first row may have
        # been written by an earlier run of the bridge: the guest's hello will tell.
        first = store.outbox(self.vm, limit=1, withdrawn=True)
        self._written_seq = first[0].seq if first else 0
        self._loop: asyncio.Task[None] | None = None
        # Set while the VM migrates away from this host (hostbridge.pool): nothing more is
        # written to the guest, whatever the link's state.
        self.paused = False
        # Where the removal of acknowledged rows is committed: the bridge sets its shared
        # committer; alone (tests of this module), each removal is its own transaction.
        self.committer = GroupCommit(store, enabled=False)
        # The next row to deliver, read in the transaction that recorded the last outcome
        # (Store.finish_next), with the token it was read under; valid only while the token is
        # the same (_token), else read again.
        self._ahead: _Ahead | None = None
        # Bumped by whatever may remove or withdraw rows behind the delivery loop's back.
        self._changes = 0
        # Told each message's final outcome once it is durable: (seq, outcome, its outbox row
        # when at hand: a message withdrawn before it was written is known by its seq only).
        # The owner publishes it (events, metrics); it must not raise.
        self.on_outcome: Callable[[int, str, OutboxRow | None], None] = _ignore_outcome

    @property
    def vm(self) -> str:
        return self.session.name

    def start(self) -> None:
        """Start delivering (needs a running loop)."""
        if self._loop is None:
            self._loop = self._tasks.spawn(self._deliver_loop(), "deliver")

    def pause(self) -> None:
        """Stop delivering (the VM is migrating away); resume() or the VM's loss ends it. The
        link is not connected again either once it ends: the switch-over ends it, and the
        socket going away would take a connect only to reset it."""
        self.paused = True
        self._changes += 1
        self.session.hold_connects()

    def resume(self) -> None:
        """Deliver again (this host holds the VM: claimed, or a migration away failed), and
        connect again if the link ended meanwhile."""
        self.paused = False
        self.session.allow_connects()
        self._wake.set()

    @property
    def blocked(self) -> bool:
        """Whether this host may not deliver now: paused, or (in a pool) another host holds the
        VM. A sender then hears "queued" at once instead of waiting for an ack."""
        return self.paused or self.store.held(self.vm) is None

    # -- what senders use -----------------------------------------------------------------------

    def wake(self) -> None:
        """A row was added: deliver it when the link allows."""
        self._wake.set()

    def wait(self, seq: int) -> asyncio.Future[int]:
        """A future for the outcome of row ``seq``; forget() it when giving up on it."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(seq, []).append(fut)
        return fut

    def forget(self, seq: int, fut: asyncio.Future[int]) -> None:
        waiting = self._waiters.get(seq, [])
        if fut in waiting:
            waiting.remove(fut)
        if not waiting:
            self._waiters.pop(seq, None)

    @property
    def waiting(self) -> int:
        """Senders waiting for an acknowledgement."""
        return sum(len(futs) for futs in self._waiters.values())

    def was_written(self, seq: int) -> bool:
        """Whether the guest may have received row ``seq``."""
        return seq <= self._written_seq

    def withdraw(self, seqs: list[int] | None, outcome: str) -> tuple[list[int], list[int]]:
        """Withdraw rows ``seqs`` (None: all) as "cancelled" or "expired": (withdrawn, in_flight).

        Withdrawn rows are gone and never delivered; their senders get the outcome. In-flight
        rows (written, not acknowledged) lose their value and are never written again; the
        guest's answer decides their outcome (Store.withdraw).
        """
        # A row read ahead may be one withdrawn now, never to be written: read again.
        self._changes += 1
        withdrawn, in_flight = self.store.withdraw(self.vm, seqs, outcome, self._written_seq)
        for seq in withdrawn:
            self._settle(seq, self._withdrawn_error(seq, outcome))
            self.on_outcome(seq, outcome, None)
        return withdrawn, in_flight

    def _withdrawn_error(self, seq: int, outcome: str) -> Exception:
        if outcome == "expired":
            return MessageExpired(
                "message %d to VM %r expired before it was delivered" % (seq, self.vm)
            )
        return MessageCancelled(
            "message %d to VM %r was cancelled before it was delivered" % (seq, self.vm)
        )

    # -- what the link tells us -----------------------------------------------------------------

    def on_synced(self, result: HelloResult) -> None:
        hseq = result.hseq if result.epoch == self.epoch else 0
        self._changes += 1  # the sync settles rows: a row read ahead may be gone
        try:
            self._synced(hseq)
        except (errors.StoreError, sqlite3.Error) as e:
            # Not ours to record (fenced), or the database is away: the rows stay, and the next
            # sync, or the owner's, settles them; the guest drops what it holds already.
            self.session.log.warning("cannot settle the outbox at sync: %s", e)
        self._written_seq = max(self._written_seq, hseq)
        self._wake.set()

    def _synced(self, hseq: int) -> None:
        # Everything up to hseq in our epoch was applied by the guest, acknowledged or not.
        rows = self.store.outbox(self.vm, limit=1 << 30, withdrawn=True)
        done = [r for r in rows if r.seq <= hseq]
        if done:
            self._delivered(done)
        # Withdrawn while in flight, and the guest did not apply it: withdrawn for good.
        for row in rows:
            if row.seq > hseq and row.withdrawn is not None:
                self.store.finish(self.vm, [row.seq], row.withdrawn)
                self._settle(row.seq, self._withdrawn_error(row.seq, row.withdrawn))
                self.on_outcome(row.seq, row.withdrawn, row)
        self._written_seq = hseq

    def on_link_down(self) -> None:
        self._changes += 1
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(LinkReset("the agent in VM %r disconnected" % self.vm))

    # -- delivering -----------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.session.state is State.SYNCED and not self.paused:
                rows = self._take_ahead()
                try:
                    if rows is None:
                        # In a pool, this read checks the fence too (hostbridge.pgstore).
                        rows = self.store.deliverable(self.vm)
                except errors.Fenced:
                    break  # another host delivers it; a claim wakes this loop again
                except (errors.StoreError, sqlite3.Error) as e:
                    self.session.warn.warn(
                        "store", "cannot read the outbox: %s; trying again in 1 s", e
                    )
                    await asyncio.sleep(1.0)
                    continue
                if rows and rows[0].expires is not None and rows[0].expires <= time.time():
                    self.withdraw([rows[0].seq], "expired")  # before the bridge's sweep saw it
                    continue
                if not rows or not await self._deliver(rows[0]):
                    break

    def _token(self) -> tuple[int, int | None]:
        # What a row read ahead depends on: no withdrawal, sync or pause since, and the same
        # fence (a claim lost and made again: another host may have delivered meanwhile).
        return self._changes, self.store.held(self.vm)

    def _take_ahead(self) -> list[OutboxRow] | None:
        """The next rows read with the last outcome, when still valid (None: read them)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != self._token():
            return None
        return ahead[1]

    def _record(self, seq: int, outcome: str) -> Callable[[sqlite3.Connection], _Ahead]:
        """The group commit's unit recording ``outcome`` of row ``seq`` (the fence checked, in
        a pool) and reading the next row in the same statement, with the token it was read
        under. That row is used only after the unit's COMMIT returned (it may be a send of the
        same group, durable only then), and only if the token is the same then (_take_ahead)."""

        def unit(db: sqlite3.Connection) -> _Ahead:
            return self._token(), self.store.finish_next(self.vm, [seq], outcome)

        prepare_finish = getattr(self.store, "prepare_finish_next", None)
        if prepare_finish is None:
            return unit

        def prepare() -> PreparedWrite:
            # Committed beside the loop (the pool's store): the token of now, before the
            # commit; anything that changes it meanwhile makes the row read again.
            token = self._token()
            write: PreparedWrite = prepare_finish(self.vm, [seq], outcome)
            return PreparedWrite(write.sql, write.params, lambda row: (token, write.result(row)))

        return Preparable(unit, prepare)

    async def _deliver(self, row: OutboxRow) -> bool:
        """Send one row and wait for its acknowledgement; False when the link failed."""
        # No await between here and the write in request(): see the module's docstring.
        self._written_seq = max(self._written_seq, row.seq)
        try:
            await self.session.request(_request_for(row), self.timeout, internal=True)
        except GuestError as e:
            if e.code == "busy":
                # Transient, never a refusal: an agent restarted behind QEMU's socket (which tells
                # the host nothing) answers "busy, send hello first". Resync, then deliver again.
                self.session.log.info(
                    "delivery of %d deferred (%s); resynchronizing", row.seq, e.message
                )
                if self.session.state is State.SYNCED:
                    self.session.resync("the guest answered busy")
                return False
            self.session.warn.warn(
                "refused",
                "the guest refused message %d (key %r): %s",
                row.seq,
                row.key,
                e.message,
            )
            return await self._failed(row, e)
        except errors.NotFound as e:  # not an answer to set/del; treat as a refusal
            return await self._failed(row, GuestError(e.message, e.code))
        except errors.BridgeError as e:
            self.session.log.debug("delivery of %d interrupted: %s", row.seq, e.message)
            return False
        return await self._acknowledged(row)

    async def _acknowledged(self, row: OutboxRow) -> bool:
        """Remove row ``row`` the guest acknowledged, then answer its senders "delivered".

        Why the removal is grouped: a crash between the guest's ack and this commit loses nothing;
        the row is still in the outbox after a restart, and the guest's hello (hseq) marks it
        delivered without sending it again (were it sent, the guest would drop the seq it has
        applied). So it need not cost an fsync of its own, and shares the next group commit with
        other guests' acks and the sends that arrive meanwhile.

        Why the senders are answered only after that commit, although answering at the ack would
        be as safe: the commit is due on the very next turn of the loop, and the loop runs one
        thing at a time, so an answer sent first would gain at most that one shared commit. In
        exchange a sender who heard "delivered" finds the same everywhere at once: the outbox,
        `queued`, the audit and a retry with the same idempotency key.

        The next row is read by the removal's own statement (Store.finish_next: in a pool, one
        round trip instead of two, under the same fence check), leaving out the row it removes,
        and is written to the guest only after that commit returned: a row another unit of the
        same group enqueued is durable by then. A withdrawal, a sync, a pause or a change of
        fence between that commit and the loop's next turn makes the loop read again instead
        (_take_ahead): a row withdrawn meanwhile must never be written.
        """
        seq = row.seq
        self._unhide([row])
        try:
            self._ahead = await self.committer.run(self._record(seq, "delivered"))
        except (errors.BridgeError, sqlite3.Error) as e:
            # The guest holds it, so its senders hear so; the row stays in the outbox until the
            # next sync or send retries the delivery (a duplicate the guest drops). Fenced: the
            # VM migrated and its new owner claimed it meanwhile; that owner's sync (hseq)
            # settles the row, as expected in a handoff.
            level = logging.INFO if isinstance(e, errors.Fenced) else logging.ERROR
            self.session.log.log(level, "cannot record the delivery of %d: %s", seq, e)
            self._settle(seq, None)
            self.on_outcome(seq, "delivered", row)  # the guest holds it, recorded or not
            return False
        self._settle(seq, None)
        self.on_outcome(seq, "delivered", row)
        return True

    def _unhide(self, rows: list[OutboxRow]) -> None:
        for row in rows:
            if (
                row.value is not None
                and row.log
                and row.key in self.mirror.hidden  # else nothing to unhide: no query
                and not self.store.secret_pending(self.vm, row.key, row.seq)
            ):
                self.mirror.unhide(row.key)  # the guest now holds a value we may keep on disk

    def _delivered(self, rows: list[OutboxRow]) -> None:
        self._unhide(rows)
        seqs = [row.seq for row in rows]
        self.store.finish(self.vm, seqs, "delivered")
        for row in rows:
            self._settle(row.seq, None)
            self.on_outcome(row.seq, "delivered", row)

    async def _failed(self, row: OutboxRow, exc: GuestError) -> bool:
        """Record that the guest refused row ``row``, then tell its senders; False when that
        could not be recorded. The sender hears "refused" only once that is durable: were the
        row still in the outbox after a crash, it would be sent again, and the guest might take
        it this time, a message applied after its sender was told it was not."""
        seq = row.seq
        try:
            self._ahead = await self.committer.run(self._record(seq, "failed"))
        except (errors.BridgeError, sqlite3.Error) as e:
            self.session.log.error("cannot record the refusal of %d: %s", seq, e)
            return False
        self._settle(seq, exc)
        self.on_outcome(seq, "failed", row)
        return True

    def _settle(self, seq: int, exc: Exception | None) -> None:
        for fut in self._waiters.pop(seq, []):
            if fut.done():
                continue
            if exc is None:
                fut.set_result(seq)
            else:
                fut.set_exception(exc)
