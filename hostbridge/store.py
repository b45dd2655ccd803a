"""The bridge's durable state: one SQLite file (WAL) holding, per VM, its stream identity, the
outbox of host messages not yet acknowledged, the mirror of the guest's keys, and the audit trail.

Durability: synchronous=FULL, so a transaction that returned (an outbox row, hence a "queued" or
"delivered" answer to a caller) survives kill -9 and power loss. The bridge's sends share such
transactions (batch(), through hostbridge.groupcommit), and are answered once theirs returned.

Secrecy (log=no): such a value is on disk only in its outbox row, and only until the guest
acknowledged it. secure_delete=ON zeroes deleted content, and a TRUNCATE checkpoint after the
delete folds the WAL into the main file and empties it, so the bytes linger in neither file.
The audit row of such a send has value NULL; the mirror keeps such a key's value in memory only
(its row has value NULL and hidden=1). A message withdrawn before delivery (cancelled, or past its
expiry) loses its value the same way: deleted, or, when the guest may already hold it, kept as a
valueless "withdrawn" row until the guest's answer says which outcome it had (withdraw()).

Calls are synchronous and short: the bridge calls them from its event loop thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from .config import Limits

log = logging.getLogger(__name__)

AUDIT_VALUE_MAX = 1024  # bytes of UTF-8, as the original manager's log limit
AUDIT_KEEP = Limits.audit_rows  # audit rows kept per VM unless the config says otherwise
IDEMPOTENCY_KEEP = Limits.idempotency_keys
IDEMPOTENCY_TTL = Limits.idempotency_ttl
# The outcomes of a delivery (the guest acknowledged or refused the row): finish_next()'s, and in
# a pool the ones only the holder of the VM's fence records (hostbridge.pgstore).
DELIVERY_OUTCOMES = ("delivered", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,            -- random id of the host's message stream to this VM
    seq INTEGER NOT NULL DEFAULT 0, -- the last seq given to an outbox row in that stream
    last_seen REAL,
    gid TEXT,                       -- the guest cache identity the mirror reflects
    gseq INTEGER,                   -- the guest change counter the mirror reflects
    channel TEXT,
    source TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    vm TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT,                     -- NULL: a del
    log INTEGER NOT NULL,
    created REAL NOT NULL,
    audit_id INTEGER,
    PRIMARY KEY (vm, seq)
);
CREATE TABLE IF NOT EXISTS mirror (
    vm TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,                     -- NULL when hidden
    ts REAL NOT NULL,
    origin TEXT NOT NULL,
    hidden INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (vm, key)
);
CREATE TABLE IF NOT EXISTS hidden (
    vm TEXT NOT NULL,
    key TEXT NOT NULL,              -- the host last sent this key with log=no
    PRIMARY KEY (vm, key)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    ts REAL NOT NULL,
    outcome TEXT NOT NULL,
    value TEXT,                     -- only with log on, at most AUDIT_VALUE_MAX bytes
    op TEXT NOT NULL DEFAULT 'set'
);
CREATE INDEX IF NOT EXISTS audit_vm ON audit (vm, id);
CREATE TABLE IF NOT EXISTS idempotency (
    vm TEXT NOT NULL,
    key TEXT NOT NULL,              -- a send's Idempotency-Key
    digest TEXT NOT NULL,           -- what that send asked for (Bridge: never a log=no value)
    seq INTEGER NOT NULL,           -- the outbox row it made
    outcome TEXT NOT NULL,          -- queued, then what finish() recorded (delivered, failed...)
    created REAL NOT NULL,
    PRIMARY KEY (vm, key)
);
CREATE INDEX IF NOT EXISTS idempotency_seq ON idempotency (vm, seq);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (vm, created);
"""

# Columns added to a table after its CREATE above: (table, column, declaration). open() adds the
# missing ones to a database made before them (ADD COLUMN rewrites nothing), and to a new one.
_ADDED_COLUMNS = (
    # The UNIX time after which an undelivered outbox row is dropped (expired); NULL: never.
    ("outbox", "expires", "REAL"),
    # NULL while the row waits for delivery. "cancelled" or "expired": withdrawn while the guest
    # may hold it (written, not acknowledged); its value is gone, and the guest's next answer
    # tells whether it was delivered after all or ends withdrawn.
    ("outbox", "withdrawn", "TEXT"),
)
_AFTER_COLUMNS = """
CREATE INDEX IF NOT EXISTS outbox_expires ON outbox (expires) WHERE expires IS NOT NULL;
"""


def truncate_utf8(value: str, limit: int = AUDIT_VALUE_MAX) -> str:
    data = value.encode("utf-8")
    if len(data) <= limit:
        return value
    return data[:limit].decode("utf-8", "ignore")


# An audit row as Store.audit() reads it: (id, vm, key, size, ts, outcome, value, op).
AuditRecord = tuple[int, str, str, int, float, str, str | None, str]


@dataclass
class VmRow:
    name: str
    epoch: str
    seq: int
    last_seen: float | None
    gid: str | None
    gseq: int | None
    channel: str | None
    source: str | None


@dataclass
class OutboxRow:
    vm: str
    seq: int
    key: str
    value: str | None  # None: a del
    log: bool
    created: float
    audit_id: int | None
    expires: float | None = None  # UNIX time; None: never
    withdrawn: str | None = None  # see _ADDED_COLUMNS

    def __repr__(self) -> str:  # never the value
        return "OutboxRow(vm=%r, seq=%d, key=%r, size=%s, log=%r)" % (
            self.vm,
            self.seq,
            self.key,
            None if self.value is None else len(self.value.encode("utf-8")),
            self.log,
        )


@dataclass
class IdempotencyRow:
    """A send made with an idempotency key: what it asked for, its outbox row, and its outcome
    (queued while the row waits; delivered, failed, ... once finish() removed it)."""

    key: str
    digest: str
    seq: int
    outcome: str
    created: float


@dataclass
class MirrorRow:
    key: str
    value: str | None
    ts: float
    origin: str
    hidden: bool


@dataclass
class PreparedWrite:
    """A store call's one write statement, made ready on the bridge's loop and run later with
    the rest of its group (PgStore.run_prepared); ``result`` turns the statement's first row
    into the call's result, once committed, or raises (errors.Fenced)."""

    sql: str
    params: Any
    result: Callable[[Any], Any]


@dataclass
class MirrorSave:
    """What one VM's mirror changed since its last save (Store.save_mirror's arguments)."""

    vm: str
    rows: list[MirrorRow]
    deleted: list[str]
    replace: bool
    last_seen: float | None
    gid: str | None
    gseq: int | None
    unhidden: Sequence[str] = ()


class Store:
    def __init__(
        self,
        path: str,
        audit_keep: int = AUDIT_KEEP,
        idempotency_keep: int = IDEMPOTENCY_KEEP,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
    ) -> None:
        self.path = path
        # A send's idempotency key is remembered for the VM's next idempotency_keep messages and
        # at most idempotency_ttl seconds, whichever ends first.
        self.idempotency_keep = idempotency_keep
        self.idempotency_ttl = idempotency_ttl
        # Each VM keeps its newest audit_keep audit rows; changing it takes effect at that VM's
        # next audit row.
        self.audit_keep = audit_keep
        # vm -> its audit row count, read once with COUNT(*) and then kept up to date, so that
        # pruning costs an index lookup per insert, not a count. Forgotten on any rollback.
        self._audit_counts: dict[str, int] = {}
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        # isolation_level=None: we open transactions ourselves, so each is one fsync'd commit.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._add_columns()
        self._in_batch = False
        self._scrub_due = False  # a batch removed a secret: scrub() after its COMMIT

    def _add_columns(self) -> None:
        for table, column, declaration in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(%s)" % table)}
            if column not in have:
                self._db.execute("ALTER TABLE %s ADD COLUMN %s %s" % (table, column, declaration))
        self._db.executescript(_AFTER_COLUMNS)

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("checkpoint at close failed: %s", e)
        self._db.close()

    def _tx(self) -> _Tx:
        return _Tx(self)

    def batch(self, savepoints: bool = True) -> _Tx:
        """One transaction (one fsync) around many writes: each write inside it becomes a
        savepoint, so a failed write undoes only itself. The bridge saves every VM's mirror
        and last_seen this way once a second instead of paying one fsync per VM, and commits
        concurrent sends together (hostbridge.groupcommit). ``savepoints`` is ignored: a
        savepoint of SQLite costs no round trip (hostbridge.pgstore's may leave them out)."""
        return _Tx(self, outer=True)

    def savepoint(self) -> _Tx:
        """Inside batch(): a savepoint, undone alone when its block raises. Outside: a
        transaction of its own."""
        return _Tx(self)

    def _scrub_soon(self) -> None:
        # A checkpoint cannot fold the WAL while this connection holds a write transaction open:
        # inside a batch it runs once the batch has committed (_Tx), and then only once.
        if self._in_batch:
            self._scrub_due = True
        else:
            self.scrub()

    # -- VMs ----------------------------------------------------------------------------------

    def vm(self, name: str, channel: str | None = None, source: str | None = None) -> VmRow:
        """The VM's row, created with a fresh random epoch when new."""
        with self._tx() as db:
            row = db.execute(
                "SELECT name, epoch, seq, last_seen, gid, gseq, channel, source "
                "FROM vms WHERE name=?",
                (name,),
            ).fetchone()
            if row is None:
                epoch = os.urandom(8).hex()
                db.execute(
                    "INSERT INTO vms (name, epoch, channel, source) VALUES (?,?,?,?)",
                    (name, epoch, channel, source),
                )
                return VmRow(name, epoch, 0, None, None, None, channel, source)
            if channel is not None and (channel, source) != (row[6], row[7]):
                db.execute(
                    "UPDATE vms SET channel=?, source=? WHERE name=?", (channel, source, name)
                )
                row = row[:6] + (channel, source)
            return VmRow(*row)

    def vms(self) -> list[VmRow]:
        rows = self._db.execute(
            "SELECT name, epoch, seq, last_seen, gid, gseq, channel, source FROM vms ORDER BY name"
        ).fetchall()
        return [VmRow(*r) for r in rows]

    # -- outbox -------------------------------------------------------------------------------

    def enqueue(
        self,
        vm: str,
        key: str,
        value: str | None,
        log_value: bool,
        ts: float | None = None,
        expires: float | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> OutboxRow:
        """Durably add a host set (value) or del (value None); audit it as "queued".

        ``expires``: the UNIX time after which it is dropped undelivered (None: never).
        ``idempotency``: (the send's idempotency key, its digest), remembered in the same
        transaction, so that a retry finds it (idempotent()) whatever crashed in between.
        """
        ts = time.time() if ts is None else ts
        with self._tx() as db:
            db.execute("UPDATE vms SET seq=seq+1 WHERE name=?", (vm,))
            row = db.execute("SELECT seq FROM vms WHERE name=?", (vm,)).fetchone()
            if row is None:
                raise KeyError(vm)
            seq = row[0]
            audit_id = self._audit(db, vm, key, value, ts, "queued", log_value)
            if not log_value and value is not None:
                # Before the guest can announce the value back: its mirror row stays valueless.
                db.execute("INSERT OR IGNORE INTO hidden (vm, key) VALUES (?,?)", (vm, key))
            db.execute(
                "INSERT INTO outbox (vm, seq, key, value, log, created, audit_id, expires) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (vm, seq, key, value, int(log_value), ts, audit_id, expires),
            )
            if idempotency is not None:
                self._remember(db, vm, idempotency[0], idempotency[1], seq, ts)
        return OutboxRow(vm, seq, key, value, log_value, ts, audit_id, expires)

    # -- idempotency keys ---------------------------------------------------------------------

    def _remember(
        self, db: sqlite3.Connection, vm: str, key: str, digest: str, seq: int, ts: float
    ) -> None:
        # Forget the VM's keys beyond the bounds first, each an index range: by age, and those
        # older than its last idempotency_keep messages (seqs are dense, one per message).
        db.execute(
            "DELETE FROM idempotency WHERE vm=? AND created<?", (vm, ts - self.idempotency_ttl)
        )
        db.execute(
            "DELETE FROM idempotency WHERE vm=? AND seq<=?",
            (vm, seq - max(1, self.idempotency_keep)),
        )
        db.execute(
            "INSERT OR REPLACE INTO idempotency (vm, key, digest, seq, outcome, created) "
            "VALUES (?,?,?,?,'queued',?)",
            (vm, key, digest, seq, ts),
        )

    def idempotent(self, vm: str, key: str, now: float | None = None) -> IdempotencyRow | None:
        """The send made to ``vm`` with idempotency key ``key``, if remembered (not too old)."""
        now = time.time() if now is None else now
        row = self._db.execute(
            "SELECT key, digest, seq, outcome, created FROM idempotency "
            "WHERE vm=? AND key=? AND created>=?",
            (vm, key, now - self.idempotency_ttl),
        ).fetchone()
        return None if row is None else IdempotencyRow(*row)

    def outbox(
        self, vm: str, after: int = 0, limit: int = 100, withdrawn: bool = False
    ) -> list[OutboxRow]:
        """The rows waiting for delivery, in order; ``withdrawn``: the withdrawn ones too."""
        rows = self._db.execute(
            "SELECT vm, seq, key, value, log, created, audit_id, expires, withdrawn FROM outbox "
            "WHERE vm=? AND seq>? %sORDER BY seq LIMIT ?"
            % ("" if withdrawn else "AND withdrawn IS NULL "),
            (vm, after, limit),
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], r[3], bool(r[4]), *r[5:]) for r in rows]

    def deliverable(self, vm: str) -> list[OutboxRow]:
        """The next row to write to the guest (at most one). A single host holds every VM, so
        there is no fence to check (hostbridge.pgstore's does)."""
        return self.outbox(vm, limit=1)

    def held(self, vm: str) -> int | None:
        """The fencing number this bridge holds for ``vm``: a single host holds every VM (0)."""
        return 0

    def in_outbox(self, vm: str, seq: int) -> bool:
        """Whether outbox row ``seq`` of ``vm`` still waits for delivery."""
        row = self._db.execute("SELECT 1 FROM outbox WHERE vm=? AND seq=?", (vm, seq)).fetchone()
        return row is not None

    def secret_pending(self, vm: str, key: str, after: int) -> bool:
        """Whether a later outbox row sets ``key`` with log off."""
        return (
            self._db.execute(
                "SELECT 1 FROM outbox WHERE vm=? AND key=? AND seq>? AND log=0 "
                "AND value IS NOT NULL LIMIT 1",
                (vm, key, after),
            ).fetchone()
            is not None
        )

    def queued(self, vm: str) -> int:
        count: int = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE vm=? AND withdrawn IS NULL", (vm,)
        ).fetchone()[0]
        return count

    def queued_counts(self) -> dict[str, int]:
        """Every VM's outbox length in one query (vmlist of 1,000 VMs: one query, not 1,000)."""
        return dict(
            self._db.execute("SELECT vm, COUNT(*) FROM outbox WHERE withdrawn IS NULL GROUP BY vm")
        )

    def queue_stats(self) -> dict[str, tuple[int, float]]:
        """vm -> (its outbox length, when its oldest row was sent), for the VMs with a queue, in
        one query (hostbridge.metrics scrapes 1,000 VMs with it)."""
        return {
            vm: (count, oldest)
            for vm, count, oldest in self._db.execute(
                "SELECT vm, COUNT(*), MIN(created) FROM outbox WHERE withdrawn IS NULL GROUP BY vm"
            )
        }

    def expired(self, now: float) -> dict[str, list[int]]:
        """vm -> the seqs of its rows waiting for delivery whose expiry is ``now`` or earlier."""
        due: dict[str, list[int]] = {}
        for vm, seq in self._db.execute(
            "SELECT vm, seq FROM outbox WHERE expires IS NOT NULL AND expires<=? "
            "AND withdrawn IS NULL ORDER BY vm, seq",
            (now,),
        ):
            due.setdefault(vm, []).append(seq)
        return due

    def withdraw(
        self, vm: str, seqs: Sequence[int] | None, outcome: str, written: int
    ) -> tuple[list[int], list[int]]:
        """Withdraw rows ``seqs`` (None: every row) of ``vm`` as ``outcome`` ("cancelled",
        "expired") in one transaction; return (withdrawn, in_flight) seqs, missing ones left out.

        A row above ``written`` (the highest seq the guest may hold) is deleted and its audit
        row gets ``outcome``. One at or below it may be in the guest: it keeps its place, without
        its value, marked withdrawn (and audited "<outcome>_in_flight") until the guest's answer
        finishes it. Either way no value stays behind: when one had log off, the WAL is folded
        and emptied as after a delivery (scrub()).
        """
        withdrawn: list[int] = []
        in_flight: list[int] = []
        secret = False
        query = "SELECT seq, log, value IS NOT NULL, audit_id FROM outbox WHERE vm=?"
        args: list[object] = [vm]
        if seqs is not None:
            query += " AND seq IN (%s)" % ",".join("?" * len(seqs))
            args += list(seqs)
        with self._tx() as db:
            for seq, log_value, has_value, audit_id in db.execute(query, args).fetchall():
                secret = secret or (not log_value and has_value)
                if seq <= written:
                    db.execute(
                        "UPDATE outbox SET value=NULL, withdrawn=coalesce(withdrawn, ?) "
                        "WHERE vm=? AND seq=?",
                        (outcome, vm, seq),
                    )
                    after = outcome + "_in_flight"
                    in_flight.append(seq)
                else:
                    db.execute("DELETE FROM outbox WHERE vm=? AND seq=?", (vm, seq))
                    after = outcome
                    withdrawn.append(seq)
                    self._settle_idempotency(db, vm, seq, outcome)
                if audit_id is not None:
                    db.execute(
                        "UPDATE audit SET outcome=? WHERE id=? AND outcome='queued'",
                        (after, audit_id),
                    )
        if secret:
            self._scrub_soon()
        return sorted(withdrawn), sorted(in_flight)

    def finish(self, vm: str, seqs: list[int], outcome: str) -> None:
        """Remove outbox rows (delivered, failed or withdrawn) and record the outcome in audit.

        When one of them held a value with log off, fold and empty the WAL afterwards.
        """
        if not seqs:
            return
        secret = False
        with self._tx() as db:
            for seq in seqs:
                row = db.execute(
                    "SELECT log, audit_id, value IS NOT NULL FROM outbox WHERE vm=? AND seq=?",
                    (vm, seq),
                ).fetchone()
                if row is None:
                    continue
                secret = secret or (not row[0] and row[2])
                db.execute("DELETE FROM outbox WHERE vm=? AND seq=?", (vm, seq))
                if row[1] is not None:
                    db.execute("UPDATE audit SET outcome=? WHERE id=?", (outcome, row[1]))
                self._settle_idempotency(db, vm, seq, outcome)
        if secret:
            self._scrub_soon()

    def finish_next(self, vm: str, seqs: list[int], outcome: str) -> list[OutboxRow]:
        """finish() the rows the guest answered ("delivered" or "failed"), then return what
        deliverable() would then: the delivery's next row, so that a delivery pays no read of
        its own after each acknowledgement (hostbridge.pgstore's is one statement, under one
        check of the fence). Inside a batch the row may be one its COMMIT is yet to make
        durable: the caller writes it to a guest only once that batch has committed."""
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError("finish_next records a delivery's outcome, not %r" % outcome)
        # One connection, one thread and no fence: the read needs no transaction of its own.
        self.finish(vm, seqs, outcome)
        return self.deliverable(vm)

    @staticmethod
    def _settle_idempotency(db: sqlite3.Connection, vm: str, seq: int, outcome: str) -> None:
        # A retry with the same key then answers this outcome. "refused" kept nothing and applied
        # nothing (the sender was told so): a retry may send it afresh.
        if outcome == "refused":
            db.execute("DELETE FROM idempotency WHERE vm=? AND seq=?", (vm, seq))
        else:
            db.execute("UPDATE idempotency SET outcome=? WHERE vm=? AND seq=?", (outcome, vm, seq))

    def scrub(self) -> None:
        """Fold the WAL into the file and truncate it (deleted content is already zeroed)."""
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("WAL checkpoint was blocked; a removed secret may linger in the WAL")

    # -- audit --------------------------------------------------------------------------------

    def _audit(
        self,
        db: sqlite3.Connection,
        vm: str,
        key: str,
        value: str | None,
        ts: float,
        outcome: str,
        log_value: bool,
        op: str | None = None,
    ) -> int:
        size = 0 if value is None else len(value.encode("utf-8"))
        kept = truncate_utf8(value) if (log_value and value is not None) else None
        op = op or ("set" if value is not None else "del")
        cur = db.execute(
            "INSERT INTO audit (vm, key, size, ts, outcome, value, op) VALUES (?,?,?,?,?,?,?)",
            (vm, key, size, ts, outcome, kept, op),
        )
        count = self._audit_counts.get(vm)
        if count is None:
            count = db.execute("SELECT COUNT(*) FROM audit WHERE vm=?", (vm,)).fetchone()[0]
        else:
            count += 1
        excess = count - max(1, self.audit_keep)
        if excess > 0:
            # The oldest rows of this VM only, found through the (vm, id) index.
            db.execute(
                "DELETE FROM audit WHERE id IN "
                "(SELECT id FROM audit WHERE vm=? ORDER BY id LIMIT ?)",
                (vm, excess),
            )
            count -= excess
        self._audit_counts[vm] = count
        audit_id = cur.lastrowid
        assert audit_id is not None  # an INSERT sets it
        return audit_id

    def audit_refused(
        self, vm: str, key: str, value: str | None, log_value: bool, outcome: str = "refused"
    ) -> None:
        """Record a send that was not accepted (nothing else is kept)."""
        with self._tx() as db:
            self._audit(db, vm, key, value, time.time(), outcome, log_value)

    def audit(self, vm: str, limit: int = 100) -> list[AuditRecord]:
        """(id, vm, key, size, ts, outcome, value, op), newest first."""
        return self._db.execute(
            "SELECT id, vm, key, size, ts, outcome, value, op FROM audit WHERE vm=? "
            "ORDER BY id DESC LIMIT ?",
            (vm, max(0, int(limit))),
        ).fetchall()

    # -- mirror -------------------------------------------------------------------------------

    def mirror(self, vm: str) -> list[MirrorRow]:
        rows = self._db.execute(
            "SELECT key, value, ts, origin, hidden FROM mirror WHERE vm=? ORDER BY rowid", (vm,)
        ).fetchall()
        return [MirrorRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def hidden(self, vm: str) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT key FROM hidden WHERE vm=?", (vm,))}

    def save_mirror(
        self,
        vm: str,
        rows: list[MirrorRow],
        deleted: list[str],
        replace: bool,
        last_seen: float | None,
        gid: str | None,
        gseq: int | None,
        unhidden: Sequence[str] = (),
    ) -> None:
        """Write mirror changes in one transaction; ``replace`` drops the VM's old rows first.

        A hidden row is written without its value; ``unhidden`` keys leave the hidden table.
        """
        with self._tx() as db:
            for key in unhidden:
                db.execute("DELETE FROM hidden WHERE vm=? AND key=?", (vm, key))
            if replace:
                db.execute("DELETE FROM mirror WHERE vm=?", (vm,))
            for key in deleted:
                db.execute("DELETE FROM mirror WHERE vm=? AND key=?", (vm, key))
            for r in rows:
                db.execute(
                    "INSERT OR REPLACE INTO mirror (vm, key, value, ts, origin, hidden) "
                    "VALUES (?,?,?,?,?,?)",
                    (vm, r.key, None if r.hidden else r.value, r.ts, r.origin, int(r.hidden)),
                )
            db.execute(
                "UPDATE vms SET last_seen=?, gid=?, gseq=? WHERE name=?", (last_seen, gid, gseq, vm)
            )

    def save_mirrors(self, saves: Sequence[MirrorSave]) -> dict[str, Exception]:
        """Every save in one transaction (one fsync), each undone alone when it fails: the VMs
        whose save failed, with why."""
        return save_each(self, saves)


def save_one(store: Any, m: MirrorSave) -> None:
    """``store.save_mirror()`` (either backend: Store or PgStore) of what ``m`` holds."""
    store.save_mirror(m.vm, m.rows, m.deleted, m.replace, m.last_seen, m.gid, m.gseq, m.unhidden)


def save_each(store: Any, saves: Sequence[MirrorSave]) -> dict[str, Exception]:
    """``saves`` in one batch of ``store`` (either backend), one save_mirror() each: a failed one
    undoes only itself. The VMs whose save failed, with why."""
    failed: dict[str, Exception] = {}
    with store.batch():
        for m in saves:
            try:
                save_one(store, m)
            except Exception as e:  # noqa: BLE001 - one VM's write must not stop the others
                failed[m.vm] = e
    return failed


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); inside a batch, a savepoint instead."""

    def __init__(self, store: Store, outer: bool = False) -> None:
        self._store = store
        self._outer = outer
        self._savepoint = False

    def __enter__(self) -> sqlite3.Connection:
        db = self._store._db
        if self._outer or not self._store._in_batch:
            db.execute("BEGIN IMMEDIATE")
            self._store._in_batch = self._outer
        else:
            db.execute("SAVEPOINT write")
            self._savepoint = True
        return db

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        db = self._store._db
        if exc_type is not None:
            # The counts may include rows the rollback removes: count again when next needed.
            self._store._audit_counts.clear()
        if self._savepoint:
            if exc_type is not None:
                db.execute("ROLLBACK TO write")
            db.execute("RELEASE write")
            return False
        self._store._in_batch = False
        scrub, self._store._scrub_due = self._store._scrub_due, False
        try:
            db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        except BaseException:
            self._store._audit_counts.clear()
            # A COMMIT that failed may leave the transaction open (SQLITE_BUSY, a deferred
            # constraint): undo it, or every later BEGIN on this connection would fail too.
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the COMMIT's own error, raised below, is the one to report
            raise
        if scrub and exc_type is None:
            try:
                self._store.scrub()
            except sqlite3.Error as e:  # committed already: the writes stand, only the fold failed
                log.warning("WAL checkpoint after a batch failed: %s", e)
        return False
