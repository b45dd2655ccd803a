"""The pool's store: the same durable state as hostbridge.store.Store (SQLite), in one PostgreSQL
database that every bridge of a pool shares, plus who owns which VM (docs/pool.md).

    store = PgStore("postgresql://hostbridge@db/ovmd", "hv1", PoolKey.load(path))
    store.claim("web1")                       # this host delivers web1's outbox now: fence 7
    store.deliverable("web1")                 # the next row, read only while the fence holds

The callers are Store's (the bridge, its group committer, a guest's delivery): the same methods,
arguments, results and transactions (batch(), savepoint()). What differs, and why:

- The group commits of the send path (an enqueue, a delivery's removal: prepare_enqueue(),
  prepare_finish_next()) run on a commit thread with a connection of its own, one round trip a
  group, while the bridge's loop goes on (run_prepared(); hostbridge.groupcommit says why it is
  safe). Every other call first waits for that group (settle()).
- Everything else: one synchronous connection, called from the bridge's event loop: every call
  is one short statement where it can be (an enqueue, a finish, a save of every mirror: one
  round trip each, their parts joined in one statement by data-modifying CTEs) and bounded by
  statement_timeout, lock_timeout and TCP keepalives. Each round trip stops the bridge's loop,
  so a transaction's BEGIN, SAVEPOINT and RELEASE take none of their own (pipeline mode, _Tx):
  a group of n units committed there costs n + 1 round trips, a lone unit one (alone()). Both
  connections connect again the same way after a failure. Nothing here retries a write: a
  connection that failed is dropped, the caller gets StoreUnavailable (one line), and the next
  call connects again. A connection lost inside batch() fails every later write of that batch,
  and the batch itself: a unit that had succeeded before the loss is not committed, so its
  sender must not hear so.
- Several bridges write: seq numbers come from ``UPDATE vms SET seq = seq + 1 ... RETURNING``
  (the row lock serializes them), and an enqueue for a VM another host owns NOTIFYs that host's
  channel in the same transaction (delivered at COMMIT, and only then).
- Fencing: only the holder of a VM's current fencing number reads its next row to deliver
  (deliverable()) or removes the rows the guest acknowledged or refused (finish() "delivered",
  "failed"; other outcomes and withdraw() need no fence); the check shares the statement, and
  its FOR SHARE lock makes a competing claim wait for the delivery to commit.
  A bridge whose fence is stale gets errors.Fenced and forgets the fence. So that a send
  through the owner costs no read of its own, the reads ride on statements the send makes
  anyway, under the same check: the owner's enqueue reads the VM's next row (deliverable()
  takes it once that enqueue committed: _note_ahead), and the removal of an acknowledged row
  reads the one after it (finish_next()).
- log=no values are sealed with the pool key (hostbridge.poolkey) before they leave the process,
  bound to their row (VM, seq, key), and opened only when an outbox row is read: the database,
  its WAL and its backups never hold one in clear. scrub() has nothing to fold (VACUUM removes
  deleted rows; what they held was ciphertext anyway).
- Values are bytea (UTF-8): a value may hold U+0000, which PostgreSQL's text cannot.
- The audit is pruned per VM every AUDIT_PRUNE_EVERY audit rows this process writes to it (one
  index range delete), not at each row: several bridges write one VM's audit, so no process can
  keep an exact count. A VM's audit thus holds at most about audit_keep + AUDIT_PRUNE_EVERY rows
  per writing bridge between prunes; audit() returns the newest anyway.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import os
import select
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from .errors import Fenced, StoreError, StoreUnavailable
from .poolkey import PoolKey
from .store import (
    AUDIT_KEEP,
    DELIVERY_OUTCOMES,
    IDEMPOTENCY_KEEP,
    IDEMPOTENCY_TTL,
    AuditRecord,
    IdempotencyRow,
    MirrorRow,
    MirrorSave,
    OutboxRow,
    PreparedWrite,
    VmRow,
    save_each,
    truncate_utf8,
)

log = logging.getLogger(__name__)

PLACEMENT_CHANNEL = "ovmd_placement"
HOST_CHANNEL_PREFIX = "ovmd_host_"
DEFAULT_LEASE = 15.0  # seconds; the pool's [pool] lease default, until register_host() says
RECONNECT_PAUSE = 0.5  # seconds after a failed connect before the next try
AUDIT_PRUNE_EVERY = 64  # audit rows this process writes to one VM between two prunes of it
# Seconds a next row read by the owner's enqueue stays good for deliverable(); the delivery
# takes it on the loop's next turn. The bound keeps a row that no local change dropped (only
# another bridge's cancel, which leaves every row in flight anyway) from being used late.
AHEAD_TTL = 1.0
# Every session's bounds, so that no call blocks the bridge's loop for long: a statement, a wait
# for a row lock, and a transaction left open by a stuck caller.
SESSION_OPTIONS = (
    "-c statement_timeout=5000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=30000"
)
# TCP: a peer that vanished without a FIN is noticed within seconds, not the kernel's hours.
_TCP_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,  # ms of unacknowledged data
    "application_name": "ovmd-hostbridge",
}
_SCHEMA_LOCK = 0x6F766D64  # "ovmd": the advisory lock the bridges starting at once take turns on
# The database's clock, in UNIX seconds: heartbeats and leases never depend on the hosts' clocks.
_NOW = "extract(epoch FROM clock_timestamp())::float8"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name text PRIMARY KEY,
    epoch text NOT NULL,
    seq bigint NOT NULL DEFAULT 0,
    last_seen double precision,
    gid text,
    gseq bigint,
    channel text,
    source text
);
CREATE TABLE IF NOT EXISTS outbox (
    vm text NOT NULL,
    seq bigint NOT NULL,
    key text NOT NULL,
    value bytea,                    -- UTF-8; NULL: a del; log false: sealed (hostbridge.poolkey)
    log boolean NOT NULL,
    created double precision NOT NULL,
    audit_id bigint,
    expires double precision,
    withdrawn text,
    PRIMARY KEY (vm, seq)
);
CREATE INDEX IF NOT EXISTS outbox_expires ON outbox (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS mirror (
    vm text NOT NULL,
    key text NOT NULL,
    value bytea,                    -- UTF-8; NULL when hidden
    ts double precision NOT NULL,
    origin text NOT NULL,
    hidden boolean NOT NULL DEFAULT false,
    pos bigserial,                  -- the order of the last writes, as SQLite's rowid
    PRIMARY KEY (vm, key)
);
CREATE TABLE IF NOT EXISTS hidden (
    vm text NOT NULL,
    key text NOT NULL,
    PRIMARY KEY (vm, key)
);
CREATE TABLE IF NOT EXISTS audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm text NOT NULL,
    key text NOT NULL,
    size integer NOT NULL,
    ts double precision NOT NULL,
    outcome text NOT NULL,
    value bytea,                    -- UTF-8, only with log on, at most AUDIT_VALUE_MAX bytes
    op text NOT NULL DEFAULT 'set'
);
CREATE INDEX IF NOT EXISTS audit_vm ON audit (vm, id);
CREATE TABLE IF NOT EXISTS idempotency (
    vm text NOT NULL,
    key text NOT NULL,
    digest text NOT NULL,
    seq bigint NOT NULL,
    outcome text NOT NULL,
    created double precision NOT NULL,
    PRIMARY KEY (vm, key)
);
CREATE INDEX IF NOT EXISTS idempotency_seq ON idempotency (vm, seq);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (vm, created);
CREATE TABLE IF NOT EXISTS hosts (
    host text PRIMARY KEY,
    url text NOT NULL,
    heartbeat double precision NOT NULL,    -- the database's clock
    started double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS placement (
    vm text PRIMARY KEY,
    host text,                      -- NULL: released, nobody owns it
    fence bigint NOT NULL DEFAULT 0,
    state text NOT NULL,            -- running, migrating, released
    since double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS placement_host ON placement (host);
"""

_TABLES = ("vms", "outbox", "mirror", "hidden", "audit", "idempotency", "hosts", "placement")
_OUTBOX_COLUMNS = "vm, seq, key, value, log, created, audit_id, expires, withdrawn"
_VM_COLUMNS = "name, epoch, seq, last_seen, gid, gseq, channel, source"
# The channel of the placement's owner, computed as channel_for_host() does.
_OWNER_CHANNEL = (
    "'%s' || left(encode(sha256(convert_to(pl.host, 'UTF8')), 'hex'), 24)" % HOST_CHANNEL_PREFIX
)
# The audit rows of %(vm)s beyond the newest %(keep)s + the one this statement adds (a statement
# does not see its own insert), through the (vm, id) index.
_PRUNE = (
    "p AS (DELETE FROM audit WHERE vm = %(vm)s AND id <= "
    "(SELECT id FROM audit WHERE vm = %(vm)s ORDER BY id DESC OFFSET %(keep)s LIMIT 1))"
)


def channel_for_host(host: str) -> str:
    """The LISTEN channel of ``host``'s wake-ups: a safe identifier whatever the host's name."""
    return HOST_CHANNEL_PREFIX + hashlib.sha256(host.encode("utf-8")).hexdigest()[:24]


@dataclass
class Placement:
    vm: str
    host: str | None  # None: released, nobody owns it
    fence: int
    state: str  # running, migrating, released
    since: float
    url: str | None  # the owner's API (hosts.url)
    alive: bool  # the owner's heartbeat is younger than the lease


@dataclass
class HostRow:
    host: str
    url: str
    heartbeat: float
    started: float
    alive: bool


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "(an invalid database address)"
    if "password" not in params:
        return url
    return make_conninfo("", **{k: v for k, v in params.items() if k != "password"})


def session_conninfo(url: str, connect_timeout: float) -> str:
    """``url`` with the bounds every pool connection runs with; the url's own settings win, and
    its options come after ours (so that its -c settings win too). psycopg.ProgrammingError when
    ``url`` is no libpq URI or conninfo."""
    params = conninfo_to_dict(url)
    extra: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq's least useful value
        **_TCP_SETTINGS,
    }
    for name in list(extra):
        if name in params:
            del extra[name]
    options = str(params.get("options") or "")
    extra["options"] = (SESSION_OPTIONS + " " + options).strip()
    return make_conninfo(url, **extra)


def one_line(e: BaseException, secret: str | None = None) -> str:
    """A psycopg error as one line: the server's primary message, or the client's first line."""
    diag = getattr(e, "diag", None)
    text = getattr(diag, "message_primary", None) or str(e) or type(e).__name__
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    if secret:
        reason = reason.replace(secret, "***")
    return reason


_UNREACHABLE = "the pool database is unreachable: "


def _closed_by_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection is of no more use: closed, or its socket readable though
    nothing was asked. That is the server's goodbye at a restart, a failover or a terminated
    backend ("terminating connection due to administrator command", then EOF); a notice or a
    parameter's new value between queries is rare enough to cost a new connection too. Such a
    connection is made again before a call instead of failing the call: the first call after a
    database restart would fail on each connection otherwise."""
    if conn.closed:
        return True
    try:
        # poll, not select: a bridge with a thousand guests has descriptors past select's 1024.
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def classify(e: psycopg.Error, secret: str | None, lost: bool) -> StoreError:
    """What a caller sees of ``e``, in one line; ``lost``: the connection is closed. A message
    beginning with _UNREACHABLE means the connection is of no more use."""
    reason = one_line(e, secret)
    lost = lost or isinstance(e, psycopg.InterfaceError)
    sqlstate = getattr(getattr(e, "diag", None), "sqlstate", None) or ""
    if lost or sqlstate[:2] in ("08", "57"):  # connection exception, operator intervention
        return StoreUnavailable(_UNREACHABLE + reason)
    if isinstance(e, (pgerrors.QueryCanceled, pgerrors.LockNotAvailable)):
        return StoreUnavailable("the pool database did not answer in time: %s" % reason)
    if sqlstate[:2] == "40":  # deadlock or serialization: nothing was kept, try again
        return StoreUnavailable("the pool database is busy: %s" % reason)
    return StoreError("the pool database failed: %s" % reason)


def _aad(vm: str, seq: int, key: str) -> bytes:
    # The row a sealed value belongs to: moved to another VM, seq or key, it fails to open.
    return b"ovmd outbox v1\0%s\0%d\0%s" % (vm.encode("utf-8"), seq, key.encode("utf-8"))


def _text(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).decode("utf-8")


def _utf8(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8")


def _enqueue_sql(known_seq: bool, prune: bool, idempotency: bool, ahead: bool = False) -> str:
    """An enqueue in one statement: the seq, the audit row, the outbox row, the hidden key, the
    idempotency key, the audit's pruning, and the owner's wake-up. ``ahead`` (the owner's
    enqueue, %(fence)s held): also the check of that fence, share-locked to COMMIT as a
    delivery's, the VM's seq and next row to deliver as the statement's snapshot has them (it
    does not see its own insert), for PgStore.deliverable() to take without a read of its own."""
    if known_seq:  # taken by a statement before (a sealed value is bound to its seq)
        parts = ["v AS (SELECT %(seq)s::bigint AS seq)"]
    else:
        parts = ["v AS (UPDATE vms SET seq = seq + 1 WHERE name = %(vm)s RETURNING seq)"]
    parts += [
        "a AS (INSERT INTO audit (vm, key, size, ts, outcome, value, op) "
        "SELECT %(vm)s, %(key)s, %(size)s::integer, %(ts)s::float8, 'queued', %(kept)s::bytea, "
        "%(op)s FROM v RETURNING id)",
        "o AS (INSERT INTO outbox (vm, seq, key, value, log, created, audit_id, expires) "
        "SELECT %(vm)s, v.seq, %(key)s, %(value)s::bytea, %(log)s::boolean, %(ts)s::float8, a.id, "
        "%(expires)s::float8 FROM v, a)",
        # Before the guest can announce the value back: its mirror row stays valueless.
        "h AS (INSERT INTO hidden (vm, key) SELECT %(vm)s, %(key)s FROM v WHERE %(hide)s::boolean "
        "ON CONFLICT DO NOTHING)",
    ]
    if prune:
        parts.append(_PRUNE)
    if idempotency:
        # The VM's keys beyond the bounds go first (by age, and older than its last ikeep
        # messages: seqs are dense); the key being remembered is replaced, not deleted, as one
        # statement may not change a row twice.
        parts += [
            "f AS (DELETE FROM idempotency WHERE vm = %(vm)s AND key <> %(ikey)s "
            "AND (created < %(icut)s::float8 OR seq <= (SELECT seq FROM v) - %(ikeep)s::bigint))",
            "i AS (INSERT INTO idempotency (vm, key, digest, seq, outcome, created) "
            "SELECT %(vm)s, %(ikey)s, %(digest)s, v.seq, 'queued', %(ts)s::float8 FROM v "
            "ON CONFLICT (vm, key) DO UPDATE SET digest = EXCLUDED.digest, seq = EXCLUDED.seq, "
            "outcome = 'queued', created = EXCLUDED.created)",
        ]
    select = (
        "\nSELECT v.seq, a.id, (SELECT count(*) FROM placement pl, LATERAL (SELECT pg_notify("
        + _OWNER_CHANNEL
        + ", %(vm)s)) n WHERE pl.vm = %(vm)s AND pl.host <> %(me)s)"
    )
    if not ahead:
        return "WITH " + ",\n".join(parts) + select + " FROM v, a"
    parts.append(
        "fx AS (SELECT 1 FROM placement WHERE vm = %(vm)s AND host = %(me)s "
        "AND fence = %(fence)s::bigint FOR SHARE)"
    )
    return (
        "WITH "
        + ",\n".join(parts)
        + select
        + ", (SELECT count(*) FROM fx), (SELECT seq FROM vms WHERE name = %(vm)s), nx.* "
        "FROM v CROSS JOIN a LEFT JOIN LATERAL (SELECT "
        + _OUTBOX_COLUMNS
        + " FROM outbox WHERE vm = %(vm)s AND withdrawn IS NULL ORDER BY seq LIMIT 1) nx ON true"
    )


def _finish_sql(fenced: bool, refused: bool, next_row: bool = False) -> str:
    """A finish in one statement: with ``fenced``, nothing is removed unless this host holds the
    VM's current fence, whose row stays share-locked until COMMIT (a claim waits for it).
    ``next_row`` (fenced only): the VM's next row to deliver too, under the same check, as
    deliverable() reads it; the statement still sees the rows it removes, hence the seqs left
    out."""
    parts = []
    if fenced:
        parts.append(
            "f AS (SELECT 1 FROM placement WHERE vm = %(vm)s AND host = %(me)s "
            "AND fence = %(fence)s::bigint FOR SHARE)"
        )
    parts += [
        "d AS (DELETE FROM outbox WHERE vm = %(vm)s AND seq = ANY(%(seqs)s::bigint[])"
        + (" AND EXISTS (SELECT 1 FROM f)" if fenced else "")
        + " RETURNING seq, audit_id)",
        "a AS (UPDATE audit SET outcome = %(outcome)s WHERE id IN (SELECT audit_id FROM d))",
    ]
    # A retry with the same idempotency key then answers this outcome. "refused" kept nothing and
    # applied nothing (the sender was told so): a retry may send it afresh.
    if refused:
        parts.append(
            "i AS (DELETE FROM idempotency WHERE vm = %(vm)s AND seq IN (SELECT seq FROM d))"
        )
    else:
        parts.append(
            "i AS (UPDATE idempotency SET outcome = %(outcome)s "
            "WHERE vm = %(vm)s AND seq IN (SELECT seq FROM d))"
        )
    check = "(SELECT count(*) FROM f)" if fenced else "1"
    select = "\nSELECT %s, (SELECT count(*) FROM d)" % check
    if next_row:
        assert fenced
        select += (
            ", n.* FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT %s FROM outbox "
            "WHERE vm = %%(vm)s AND withdrawn IS NULL AND NOT (seq = ANY(%%(seqs)s::bigint[])) "
            "AND EXISTS (SELECT 1 FROM f) ORDER BY seq LIMIT 1) n ON true" % _OUTBOX_COLUMNS
        )
    return "WITH " + ",\n".join(parts) + select


_WITHDRAW_SQL = """
WITH u AS (
    UPDATE outbox SET value = NULL, withdrawn = coalesce(withdrawn, %(outcome)s)
    WHERE vm = %(vm)s AND seq <= %(written)s::bigint
      AND (%(all)s::boolean OR seq = ANY(%(seqs)s::bigint[]))
    RETURNING seq, audit_id),
d AS (
    DELETE FROM outbox
    WHERE vm = %(vm)s AND seq > %(written)s::bigint
      AND (%(all)s::boolean OR seq = ANY(%(seqs)s::bigint[]))
    RETURNING seq, audit_id),
a AS (
    UPDATE audit SET outcome = CASE WHEN id IN (SELECT audit_id FROM d) THEN %(outcome)s::text
                                    ELSE %(outcome)s::text || '_in_flight' END
    WHERE id IN (SELECT audit_id FROM d UNION ALL SELECT audit_id FROM u) AND outcome = 'queued'),
i AS (
    UPDATE idempotency SET outcome = %(outcome)s
    WHERE vm = %(vm)s AND seq IN (SELECT seq FROM d))
SELECT seq, true FROM d UNION ALL SELECT seq, false FROM u
"""

_VM_SQL = f"""
WITH i AS (
    INSERT INTO vms AS t (name, epoch, channel, source)
    VALUES (%(name)s, %(epoch)s, %(channel)s, %(source)s)
    ON CONFLICT (name) DO UPDATE SET channel = EXCLUDED.channel, source = EXCLUDED.source
    WHERE %(update)s::boolean
      AND (t.channel, t.source) IS DISTINCT FROM (EXCLUDED.channel, EXCLUDED.source)
    RETURNING {_VM_COLUMNS})
SELECT {_VM_COLUMNS} FROM i
UNION ALL SELECT {_VM_COLUMNS} FROM vms WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM i)
"""

# The mirror saves of one VM or of many (the bridge's flush, once a second) in one statement:
# per VM (x) its new last_seen, gid and gseq, and the VMs whose rows are all replaced; rows (r),
# deleted keys (d) and keys no longer hidden (u) as parallel arrays of (vm, key, ...). A key both
# deleted and written is written (as save_mirror); the two deletions never touch the same row.
_SAVE_MIRRORS_SQL = """
WITH x AS (
    SELECT * FROM unnest(%(vms)s::text[], %(last_seens)s::float8[], %(gids)s::text[],
                         %(gseqs)s::bigint[]) AS x(vm, last_seen, gid, gseq)),
r AS (
    SELECT * FROM unnest(%(r_vms)s::text[], %(keys)s::text[], %(values)s::bytea[],
                         %(tss)s::float8[], %(origins)s::text[], %(hiddens)s::boolean[])
        WITH ORDINALITY AS r(vm, key, value, ts, origin, hidden, n)),
uh AS (
    DELETE FROM hidden h USING unnest(%(u_vms)s::text[], %(u_keys)s::text[]) AS u(vm, key)
    WHERE h.vm = u.vm AND h.key = u.key),
dr AS (
    DELETE FROM mirror m WHERE m.vm = ANY(%(replaced)s::text[])
      AND NOT EXISTS (SELECT 1 FROM r WHERE r.vm = m.vm AND r.key = m.key)),
dk AS (
    DELETE FROM mirror m USING unnest(%(d_vms)s::text[], %(d_keys)s::text[]) AS d(vm, key)
    WHERE m.vm = d.vm AND m.key = d.key AND NOT (m.vm = ANY(%(replaced)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM r WHERE r.vm = m.vm AND r.key = m.key)),
um AS (
    INSERT INTO mirror AS m (vm, key, value, ts, origin, hidden)
    SELECT r.vm, r.key, r.value, r.ts, r.origin, r.hidden FROM r ORDER BY r.n
    ON CONFLICT (vm, key) DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts,
        origin = EXCLUDED.origin, hidden = EXCLUDED.hidden, pos = EXCLUDED.pos)
UPDATE vms v SET last_seen = x.last_seen, gid = x.gid, gseq = x.gseq FROM x WHERE v.name = x.vm
"""

_CLAIM_SQL = f"""
WITH c AS (
    INSERT INTO placement AS p (vm, host, fence, state, since)
    VALUES (%(vm)s, %(me)s, 1, 'running', {_NOW})
    ON CONFLICT (vm) DO UPDATE SET host = EXCLUDED.host, fence = p.fence + 1, state = 'running',
        since = EXCLUDED.since
    WHERE p.host IS NULL OR p.host = EXCLUDED.host OR %(force)s::boolean
       OR NOT EXISTS (SELECT 1 FROM hosts h
                      WHERE h.host = p.host AND h.heartbeat >= {_NOW} - %(lease)s::float8)
    RETURNING fence)
SELECT fence, pg_notify(%(channel)s, %(vm)s::text || ' ' || %(me)s::text || ' ' || fence) FROM c
"""

_RELEASE_DEAD_SQL = f"""
WITH d AS (
    UPDATE placement p SET host = NULL, state = 'released', since = {_NOW}
    WHERE p.host IS NOT NULL AND p.host <> %(me)s
      AND NOT EXISTS (SELECT 1 FROM hosts h
                      WHERE h.host = p.host AND h.heartbeat >= {_NOW} - %(lease)s::float8)
    RETURNING p.vm, p.fence)
SELECT vm, pg_notify(%(channel)s, vm || ' - ' || fence) FROM d ORDER BY vm
"""

_RELEASE_SQL = f"""
WITH r AS (
    UPDATE placement SET host = NULL, state = 'released', since = {_NOW}
    WHERE vm = %(vm)s AND host = %(me)s AND fence = %(fence)s::bigint
    RETURNING vm, fence)
SELECT fence, pg_notify(%(channel)s, vm || ' - ' || fence) FROM r
"""

_PLACEMENT_SQL = f"""
SELECT p.vm, p.host, p.fence, p.state, p.since, h.url,
       coalesce(h.heartbeat >= {_NOW} - %(lease)s::float8, false)
FROM placement p LEFT JOIN hosts h ON h.host = p.host
"""


class PgStore:
    def __init__(
        self,
        url: str,
        host: str,
        key: PoolKey,
        audit_keep: int = AUDIT_KEEP,
        idempotency_keep: int = IDEMPOTENCY_KEEP,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        connect_timeout: float = 3.0,
    ) -> None:
        self.path = redact(url)  # for logs: never the password
        self.host = host
        self.key = key
        self.audit_keep = audit_keep
        self.idempotency_keep = idempotency_keep
        self.idempotency_ttl = idempotency_ttl
        self.lease = DEFAULT_LEASE
        self._url: str | None = None  # this host's API, once registered
        try:
            password = conninfo_to_dict(url).get("password")
            self._password = None if password is None else str(password)
            self._conninfo = session_conninfo(url, connect_timeout)
        except psycopg.Error:
            raise StoreError(
                "the pool database address is not a libpq URI or connection string"
            ) from None
        self._conn: psycopg.Connection[Any] | None = None
        # After a failed connect, no other before this monotonic time (RECONNECT_PAUSE).
        self._next_connect = 0.0
        self._last_failure = ""
        # The open transaction blocks, innermost last: True for a batch(), False for a
        # savepoint() or a method's own.
        self._blocks: list[bool] = []
        # Inside alone(): whether its one write was made; None outside.
        self._alone: bool | None = None
        # The group of prepared writes committing on the commit thread (run_prepared), its own
        # connection, and the thread (one): made at the first group.
        self._inflight: concurrent.futures.Future[list[Any]] | None = None
        self._commit_conn: psycopg.Connection[Any] | None = None
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        # vm -> bumped at each _drop_ahead(vm): a row an enqueue read counts only if no drop
        # came between the enqueue's preparing and its commit (run_prepared).
        self._ahead_drops: dict[str, int] = {}
        # The pipeline of the open transaction block (_Tx), None outside one.
        self._pipeline: psycopg.Pipeline | None = None
        # vm -> (fence, its next row to deliver, monotonic time): read by this host's own
        # enqueue as its owner (_note_ahead), taken by the next deliverable(); pending until
        # the enqueue's transaction commits.
        self._ahead: dict[str, tuple[int, OutboxRow, float]] = {}
        self._ahead_pending: list[tuple[str, int, OutboxRow]] = []
        self._closed = False
        self._held: dict[str, int] = {}  # vm -> the fence this process holds
        self._audit_writes: dict[str, int] = {}  # vm -> audit rows written since its last prune
        try:
            self._conn = self._open()
        except psycopg.Error as e:
            raise StoreUnavailable(
                "cannot reach the pool database at %s: %s"
                % (self.path, one_line(e, self._password))
            ) from None
        try:
            self._create_schema()
        except StoreError:
            self._drop()
            raise

    # -- the connection -------------------------------------------------------------------------

    def _open(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, autocommit=True)

    def _create_schema(self) -> None:
        # Made already (every start but the pool's first): nothing to lock, and a role that may
        # not create tables can run the pool.
        found = self._run(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename = ANY(%s::text[])",
            (list(_TABLES),),
        ).fetchone()
        if found is not None and found[0] == len(_TABLES):
            return
        # Three bridges start at once: CREATE ... IF NOT EXISTS is not safe against a concurrent
        # twin (both may pass the check), so the creations take turns. psycopg's own transaction,
        # not _Tx: a script of many statements needs the simple query protocol, which a
        # pipeline does not speak.
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_SCHEMA.encode("utf-8"))
        except psycopg.Error as e:
            raise self._failure(e) from e

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError("the pool database connection was closed")
        if self._inflight is not None:
            self.settle()
        conn = self._conn
        if conn is not None and not conn.closed and (self._blocks or not _closed_by_server(conn)):
            return conn
        if self._blocks:
            # The transaction in progress went with the lost connection: a new one must not
            # carry on with its second half.
            raise StoreUnavailable(
                "the pool database is unreachable: the connection was lost in a transaction"
            )
        self._drop()
        now = time.monotonic()
        if now < self._next_connect:
            # A connect failed a moment ago: each try may block the bridge's loop for up to
            # connect_timeout (an unreachable host), so calls in between fail at once.
            raise StoreUnavailable("the pool database is unreachable: %s" % self._last_failure)
        try:
            self._conn = self._open()
        except psycopg.Error as e:
            self._last_failure = one_line(e, self._password)
            self._next_connect = time.monotonic() + RECONNECT_PAUSE
            raise StoreUnavailable(
                "the pool database is unreachable: %s" % self._last_failure
            ) from None
        log.info("connected to the pool database again")
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    def _failure(self, e: psycopg.Error) -> StoreError:
        """What a caller sees of ``e``; a connection that failed is dropped (the next call
        connects again)."""
        conn = self._conn
        failure = classify(e, self._password, lost=conn is None or conn.closed)
        if failure.message.startswith(_UNREACHABLE):
            self._drop()
        return failure

    def _run(self, query: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute one statement (its result is read already: fetching is local). Inside a
        transaction block, the block's commands still queued (BEGIN, SAVEPOINT, RELEASE) go
        in the same round trip, ahead of it (_Tx)."""
        conn = self._connection()
        try:
            cur = conn.execute(query.encode("utf-8"), params)  # a str built here, never input
            if self._pipeline is not None:
                # Its result now, and its error raised here: the caller's savepoint, if any,
                # undoes it (a Sync ends the pipeline's segment, not the transaction).
                self._pipeline.sync()
            return cur
        except psycopg.Error as e:
            raise self._failure(e) from e

    def _queue(self, command: bytes, params: Any = None) -> None:
        """Send a command of the open block (a transaction command, or a write whose result
        nobody reads) without waiting for its answer: it travels with the next statement, or
        the block's COMMIT (_Tx), and its error fails that one."""
        conn = self._connection()
        try:
            conn.execute(command, params)
        except psycopg.Error as e:
            raise self._failure(e) from e

    def _write(self, query: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute one writing statement. Directly inside batch() it gets a savepoint of its own,
        so that its failure undoes only itself (as each of Store's writes does: the bridge's
        flush of every mirror); in a savepoint(), or outside any transaction, the statement is
        atomic alone, and its caller's savepoint, if any, undoes it."""
        if self._alone is not None and not self._blocks:
            if self._alone:
                raise StoreError("a second write where one alone was promised (alone())")
            self._alone = True
        if self._blocks and self._blocks[-1]:
            with self._tx():
                return self._run(query, params)
        return self._run(query, params)

    def _tx(self) -> _Tx:
        return _Tx(self)

    def close(self) -> None:
        self.settle()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        conn, self._commit_conn = self._commit_conn, None
        if conn is not None:
            conn.close()
        self._drop()
        self._closed = True

    # -- groups committed beside the loop -------------------------------------------------------

    def run_prepared(self, writes: Sequence[PreparedWrite]) -> concurrent.futures.Future[list[Any]]:
        """Commit ``writes`` (made on the loop: prepare_enqueue(), prepare_finish_next()) on
        the commit thread's own connection: one statement alone, or BEGIN, the statements and
        COMMIT in one pipeline, one round trip either way. The future's result is each
        statement's first row (turn it into a call's result with its PreparedWrite.result);
        its exception a StoreError: StoreUnavailable when the database is away (nothing can
        be said of the group), any other when a statement failed (none of the group was kept).

        Meanwhile the bridge's loop runs on. Every other call of this store first waits for
        the group's commit (settle()), so the database sees the same order of operations as
        when the group committed on the loop."""
        if self._inflight is not None:
            self.settle()
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(1, "ovmd-pool-commit")
        batch = [(w.sql.encode("utf-8"), w.params) for w in writes]
        self._inflight = self._committer.submit(self._commit_group, batch)
        return self._inflight

    def settle(self) -> None:
        """Wait for the group run_prepared() started, if any, to be committed or failed."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            concurrent.futures.wait([inflight])

    def _commit_group(self, batch: list[tuple[bytes, Any]]) -> list[Any]:
        # On the commit thread: it touches its own connection only, never the store's state.
        conn = self._commit_conn
        try:
            if conn is None or _closed_by_server(conn):
                if conn is not None:
                    conn.close()
                conn = self._commit_conn = self._open()
            if len(batch) == 1:
                return [conn.execute(*batch[0]).fetchone()]
            with conn.pipeline():  # its end: the one Sync, and every answer read
                conn.execute(b"BEGIN")
                cursors = [conn.execute(sql, params) for sql, params in batch]
                ended = conn.execute(b"COMMIT")
            if ended.statusmessage != "COMMIT":
                raise StoreError(
                    "the pool database failed: the transaction was rolled back (%s)"
                    % ended.statusmessage
                )
            return [c.fetchone() for c in cursors]
        except psycopg.Error as e:
            failure = classify(e, self._password, lost=conn is None or conn.closed)
            # Whatever state it was left in (a pipeline, an aborted transaction): a new one.
            self._commit_conn = None
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - it is gone either way
                    pass
            raise failure from e

    # The group committer may run a group's units without a savepoint each (two round trips
    # fewer per unit), and runs the group again with savepoints only when one of them fails.
    optimistic_groups = True

    def alone(self) -> _Alone:
        """A block that makes one write at most, with no transaction around it: that write is
        one statement, atomic and committed by itself (a group commit's group of one). Its
        BEGIN and COMMIT would cost a second round trip and twice the client's CPU; a second
        write in the block raises StoreError, before it is sent."""
        return _Alone(self)

    def batch(self, savepoints: bool = True) -> _Tx:
        """One transaction around many writes, as Store.batch(): a write made directly in it,
        and each savepoint() in it (the group committer's units), is a savepoint, undone alone
        when it fails. A write inside a savepoint() takes no second one: one round trip each.
        ``savepoints=False``: no savepoint at all; any failure must undo the whole block."""
        return _Tx(self, batch=savepoints)

    def savepoint(self) -> _Tx:
        """Inside batch(): a savepoint, undone alone when its block raises. Outside: a
        transaction of its own."""
        return _Tx(self)

    def scrub(self) -> None:
        """Nothing to do: removed rows leave with VACUUM, and a log=no value was ciphertext."""

    # -- VMs ------------------------------------------------------------------------------------

    def vm(self, name: str, channel: str | None = None, source: str | None = None) -> VmRow:
        """The VM's row, created with a fresh random epoch when new."""
        # Read first: a row that exists and needs no change costs no write (no WAL flush).
        row = self._run("SELECT %s FROM vms WHERE name = %%s" % _VM_COLUMNS, (name,)).fetchone()
        if row is not None and (channel is None or (channel, source) == (row[6], row[7])):
            return VmRow(*row)
        params = {
            "name": name,
            "epoch": os.urandom(8).hex(),
            "channel": channel,
            "source": source,
            "update": channel is not None,
        }
        row = self._write(_VM_SQL, params).fetchone()
        if row is None:
            # Created by another bridge after this statement's snapshot: it is there now.
            row = self._run("SELECT %s FROM vms WHERE name = %%s" % _VM_COLUMNS, (name,)).fetchone()
            if row is None:
                raise StoreError("the pool database lost VM %r's row" % (name,))
        return VmRow(*row)

    def vms(self) -> list[VmRow]:
        """Every VM of the pool."""
        rows = self._run("SELECT %s FROM vms ORDER BY name" % _VM_COLUMNS).fetchall()
        return [VmRow(*r) for r in rows]

    # -- outbox ---------------------------------------------------------------------------------

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
        """As Store.enqueue; KeyError for an unknown VM. A log=no value is sealed first."""
        prepared = self.prepare_enqueue(vm, key, value, log_value, ts, expires, idempotency)
        if prepared is not None:
            return prepared.result(self._write(prepared.sql, prepared.params).fetchone())
        assert value is not None
        params, ahead, fence = self._enqueue_params(
            vm, key, value, log_value, ts, expires, idempotency
        )
        # The sealed value is bound to its seq: take the seq first (its row lock is held to
        # COMMIT), then write the rest; two round trips, for log=no values only.
        with self._tx():
            taken = self._run(
                "UPDATE vms SET seq = seq + 1 WHERE name = %s RETURNING seq", (vm,)
            ).fetchone()
            if taken is None:
                raise KeyError(vm)
            params["seq"] = taken[0]
            params["value"] = self.key.seal(value, _aad(vm, taken[0], key)).encode("ascii")
            query = _enqueue_sql(True, params.pop("prune"), idempotency is not None, ahead)
            row = self._run(query, params).fetchone()
            return self._enqueued(row, value, params, fence, self._ahead_drops.get(vm, 0))

    def prepare_enqueue(
        self,
        vm: str,
        key: str,
        value: str | None,
        log_value: bool,
        ts: float | None = None,
        expires: float | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> PreparedWrite | None:
        """enqueue()'s one statement, to run later (run_prepared()); None for a log=no value,
        whose sealing needs its seq first (enqueue() runs it)."""
        if not log_value and value is not None:
            return None
        params, ahead, fence = self._enqueue_params(
            vm, key, value, log_value, ts, expires, idempotency
        )
        params["value"] = _utf8(value)
        query = _enqueue_sql(False, params.pop("prune"), idempotency is not None, ahead)
        drops = self._ahead_drops.get(vm, 0)
        return PreparedWrite(
            query, params, lambda row: self._enqueued(row, value, params, fence, drops)
        )

    def _enqueue_params(
        self,
        vm: str,
        key: str,
        value: str | None,
        log_value: bool,
        ts: float | None,
        expires: float | None,
        idempotency: tuple[str, str] | None,
    ) -> tuple[dict[str, Any], bool, int | None]:
        """The enqueue statement's parameters (but the value), whether it reads the VM's next
        row (this host owns the VM), and under which fence."""
        ts = time.time() if ts is None else ts
        params: dict[str, Any] = {
            "vm": vm,
            "key": key,
            "size": 0 if value is None else len(value.encode("utf-8")),
            "ts": ts,
            "kept": _utf8(truncate_utf8(value)) if (log_value and value is not None) else None,
            "op": "set" if value is not None else "del",
            "log": log_value,
            "expires": expires,
            "hide": not log_value and value is not None,
            "me": self.host,
            # The statement does not see its own audit row: keep one fewer of the others.
            "keep": max(1, self.audit_keep) - 1,
            "prune": self._prune_due(vm),
        }
        if idempotency is not None:
            params["ikey"], params["digest"] = idempotency
            params["icut"] = ts - self.idempotency_ttl
            params["ikeep"] = max(1, self.idempotency_keep)
        fence = self._held.get(vm)
        if fence is not None:
            params["fence"] = fence
        return params, fence is not None, fence

    def _enqueued(
        self,
        row: Sequence[Any] | None,
        value: str | None,
        params: dict[str, Any],
        fence: int | None,
        drops: int,
    ) -> OutboxRow:
        """The enqueue statement's row as enqueue()'s result. The VM's next row it read is kept
        for deliverable() unless what was known of the VM's head was dropped since the
        statement was made (``drops``: _ahead_drops then): a row withdrawn or removed meanwhile
        must not come back from here."""
        vm = params["vm"]
        if row is None:
            raise KeyError(vm)
        added = OutboxRow(
            vm, row[0], params["key"], value, params["log"], params["ts"], row[1], params["expires"]
        )
        if fence is not None and self._ahead_drops.get(vm, 0) == drops:
            self._note_ahead(vm, fence, added, row[3:], params["hide"])
        return added

    def _note_ahead(
        self, vm: str, fence: int, added: OutboxRow, found: Sequence[Any], secret: bool
    ) -> None:
        """Keep the next row to deliver that the owner's enqueue read (found: the fence check,
        the VM's seq and its next row, as the statement saw them), for deliverable(), when that
        row is sure: the fence held, and no other bridge's enqueue came in between the
        statement's snapshot and its seq (its row, with a lower seq, would be missing from the
        snapshot). Only once the enqueue commits (_Tx)."""
        held, seen_seq = found[0], found[1]
        # The log=no enqueue took its seq in a statement before: its snapshot sees that seq.
        if not held or seen_seq is None or seen_seq + (0 if secret else 1) != added.seq:
            self._drop_ahead(vm)
            return
        head = added if found[3] is None else self._outbox_row(found[2:])
        if self._blocks:
            self._ahead_pending.append((vm, fence, head))
        else:
            self._ahead[vm] = (fence, head, time.monotonic())

    def _drop_ahead(self, vm: str) -> None:
        """Forget what is known of ``vm``'s next row: its outbox head or its fence changed."""
        self._ahead_drops[vm] = self._ahead_drops.get(vm, 0) + 1
        self._ahead.pop(vm, None)
        if self._ahead_pending:
            self._ahead_pending = [p for p in self._ahead_pending if p[0] != vm]

    def _commit_ahead(self, committed: bool) -> None:
        """The outermost block ended: what its enqueues read counts from now, if it committed."""
        pending, self._ahead_pending = self._ahead_pending, []
        if committed:
            now = time.monotonic()
            for vm, fence, head in pending:
                self._ahead[vm] = (fence, head, now)

    def _prune_due(self, vm: str) -> bool:
        # At this process's first audit row of the VM, then every AUDIT_PRUNE_EVERY rows.
        n = self._audit_writes.get(vm, 0)
        self._audit_writes[vm] = n + 1
        return n % AUDIT_PRUNE_EVERY == 0

    def _outbox_row(self, r: Sequence[Any]) -> OutboxRow:
        vm, seq, key, value, log_value, created, audit_id, expires, withdrawn = r
        text = _text(value)
        if text is not None and not log_value:
            text = self.key.open(text, _aad(vm, seq, key))
        return OutboxRow(vm, seq, key, text, log_value, created, audit_id, expires, withdrawn)

    def idempotent(self, vm: str, key: str, now: float | None = None) -> IdempotencyRow | None:
        """The send made to ``vm`` with idempotency key ``key``, if remembered (not too old)."""
        now = time.time() if now is None else now
        row = self._run(
            "SELECT key, digest, seq, outcome, created FROM idempotency "
            "WHERE vm = %s AND key = %s AND created >= %s::float8",
            (vm, key, now - self.idempotency_ttl),
        ).fetchone()
        return None if row is None else IdempotencyRow(*row)

    def outbox(
        self, vm: str, after: int = 0, limit: int = 100, withdrawn: bool = False
    ) -> list[OutboxRow]:
        """The rows waiting for delivery, in order; ``withdrawn``: the withdrawn ones too."""
        rows = self._run(
            "SELECT %s FROM outbox WHERE vm = %%s AND seq > %%s %sORDER BY seq LIMIT %%s"
            % (_OUTBOX_COLUMNS, "" if withdrawn else "AND withdrawn IS NULL "),
            (vm, after, max(0, int(limit))),
        ).fetchall()
        return [self._outbox_row(r) for r in rows]

    def deliverable(self, vm: str) -> list[OutboxRow]:
        """The next row to write to the guest (at most one), read only while this host holds
        ``vm``'s current fence: errors.Fenced otherwise (and the fence is forgotten). Right
        after this host's own enqueue to ``vm`` committed, the row that enqueue read under the
        same fence, without a round trip (_note_ahead)."""
        fence = self._held.get(vm)
        if fence is None:
            raise Fenced(vm)
        known = self._ahead.pop(vm, None)
        if known is not None and known[0] == fence and time.monotonic() - known[2] < AHEAD_TTL:
            # Read, under this fence, by this host's enqueue that committed a moment ago; every
            # change since to the VM's outbox head or fence by this process dropped it.
            return [known[1]]
        row = self._run(
            "SELECT o.vm, o.seq, o.key, o.value, o.log, o.created, o.audit_id, o.expires, "
            "o.withdrawn FROM placement p LEFT JOIN LATERAL (SELECT %s FROM outbox "
            "WHERE vm = p.vm AND withdrawn IS NULL ORDER BY seq LIMIT 1) o ON true "
            "WHERE p.vm = %%s AND p.host = %%s AND p.fence = %%s::bigint" % _OUTBOX_COLUMNS,
            (vm, self.host, fence),
        ).fetchone()
        if row is None:
            self._lost(vm, fence)
            raise Fenced(vm)
        return [] if row[1] is None else [self._outbox_row(row)]

    def in_outbox(self, vm: str, seq: int) -> bool:
        """Whether outbox row ``seq`` of ``vm`` still waits for delivery."""
        return (
            self._run("SELECT 1 FROM outbox WHERE vm = %s AND seq = %s", (vm, seq)).fetchone()
            is not None
        )

    def secret_pending(self, vm: str, key: str, after: int) -> bool:
        """Whether a later outbox row sets ``key`` with log off."""
        return (
            self._run(
                "SELECT 1 FROM outbox WHERE vm = %s AND key = %s AND seq > %s AND NOT log "
                "AND value IS NOT NULL LIMIT 1",
                (vm, key, after),
            ).fetchone()
            is not None
        )

    def queued(self, vm: str) -> int:
        row = self._run(
            "SELECT count(*) FROM outbox WHERE vm = %s AND withdrawn IS NULL", (vm,)
        ).fetchone()
        return int(row[0]) if row else 0

    def queued_counts(self) -> dict[str, int]:
        """Every VM's outbox length in one query."""
        rows = self._run(
            "SELECT vm, count(*) FROM outbox WHERE withdrawn IS NULL GROUP BY vm"
        ).fetchall()
        return {vm: int(n) for vm, n in rows}

    def queue_stats(self) -> dict[str, tuple[int, float]]:
        """vm -> (its outbox length, when its oldest row was sent), for the VMs with a queue."""
        rows = self._run(
            "SELECT vm, count(*), min(created) FROM outbox WHERE withdrawn IS NULL GROUP BY vm"
        ).fetchall()
        return {vm: (int(n), oldest) for vm, n, oldest in rows}

    def expired(self, now: float) -> dict[str, list[int]]:
        """vm -> the seqs of its rows waiting for delivery whose expiry is ``now`` or earlier."""
        due: dict[str, list[int]] = {}
        for vm, seq in self._run(
            "SELECT vm, seq FROM outbox WHERE expires IS NOT NULL AND expires <= %s::float8 "
            "AND withdrawn IS NULL ORDER BY vm, seq",
            (now,),
        ).fetchall():
            due.setdefault(vm, []).append(seq)
        return due

    def withdraw(
        self, vm: str, seqs: Sequence[int] | None, outcome: str, written: int
    ) -> tuple[list[int], list[int]]:
        """As Store.withdraw, in one statement; needs no fence (any bridge may cancel)."""
        self._drop_ahead(vm)
        params = {
            "vm": vm,
            "outcome": outcome,
            "written": written,
            "all": seqs is None,
            "seqs": list(seqs or ()),
        }
        withdrawn: list[int] = []
        in_flight: list[int] = []
        for seq, gone in self._write(_WITHDRAW_SQL, params).fetchall():
            (withdrawn if gone else in_flight).append(seq)
        return sorted(withdrawn), sorted(in_flight)

    def finish(self, vm: str, seqs: list[int], outcome: str) -> None:
        """Remove outbox rows and record the outcome in audit (as Store.finish), in one
        statement. "delivered" and "failed" only while this host holds ``vm``'s current fence:
        errors.Fenced otherwise, and nothing is removed."""
        if not seqs:
            return
        self._drop_ahead(vm)
        fenced = outcome in DELIVERY_OUTCOMES
        params: dict[str, Any] = {
            "vm": vm,
            "seqs": list(seqs),
            "outcome": outcome,
            "me": self.host,
        }
        if fenced:
            fence = self._held.get(vm)
            if fence is None:
                raise Fenced(vm)
            params["fence"] = fence
        row = self._write(_finish_sql(fenced, outcome == "refused"), params).fetchone()
        if fenced and (row is None or not row[0]):
            self._lost(vm, params["fence"])
            raise Fenced(vm)

    def finish_next(self, vm: str, seqs: list[int], outcome: str) -> list[OutboxRow]:
        """As Store.finish_next: finish() a delivery's outcome ("delivered", "failed") and read
        what deliverable() would, in one statement and under one check of the fence (errors.Fenced
        otherwise: nothing removed, nothing read, the fence forgotten). A delivery then costs one
        read before its first row and none after each acknowledgement."""
        prepared = self.prepare_finish_next(vm, seqs, outcome)
        return prepared.result(self._write(prepared.sql, prepared.params).fetchone())

    def prepare_finish_next(self, vm: str, seqs: list[int], outcome: str) -> PreparedWrite:
        """finish_next()'s one statement, to run later (run_prepared())."""
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError("finish_next records a delivery's outcome, not %r" % outcome)
        self._drop_ahead(vm)
        fence = self._held.get(vm)
        if fence is None:
            raise Fenced(vm)
        params = {"vm": vm, "seqs": list(seqs), "outcome": outcome, "me": self.host, "fence": fence}

        def result(row: Sequence[Any] | None) -> list[OutboxRow]:
            if row is None or not row[0]:
                self._lost(vm, fence)
                raise Fenced(vm)
            return [] if row[3] is None else [self._outbox_row(row[2:])]

        return PreparedWrite(_finish_sql(True, False, next_row=True), params, result)

    # -- audit ----------------------------------------------------------------------------------

    def audit_refused(
        self, vm: str, key: str, value: str | None, log_value: bool, outcome: str = "refused"
    ) -> None:
        """Record a send that was not accepted (nothing else is kept)."""
        parts = [
            "a AS (INSERT INTO audit (vm, key, size, ts, outcome, value, op) VALUES (%(vm)s, "
            "%(key)s, %(size)s, %(ts)s, %(outcome)s, %(kept)s, %(op)s) RETURNING id)"
        ]
        if self._prune_due(vm):
            parts.append(_PRUNE)
        self._write(
            "WITH " + ", ".join(parts) + " SELECT id FROM a",
            {
                "vm": vm,
                "key": key,
                "size": 0 if value is None else len(value.encode("utf-8")),
                "ts": time.time(),
                "outcome": outcome,
                "kept": _utf8(truncate_utf8(value)) if (log_value and value is not None) else None,
                "op": "set" if value is not None else "del",
                "keep": max(1, self.audit_keep) - 1,
            },
        )

    def audit(self, vm: str, limit: int = 100) -> list[AuditRecord]:
        """(id, vm, key, size, ts, outcome, value, op), newest first."""
        rows = self._run(
            "SELECT id, vm, key, size, ts, outcome, value, op FROM audit WHERE vm = %s "
            "ORDER BY id DESC LIMIT %s",
            (vm, max(0, int(limit))),
        ).fetchall()
        return [(i, v, k, s, t, o, _text(value), op) for i, v, k, s, t, o, value, op in rows]

    # -- mirror ---------------------------------------------------------------------------------

    def mirror(self, vm: str) -> list[MirrorRow]:
        rows = self._run(
            "SELECT key, value, ts, origin, hidden FROM mirror WHERE vm = %s ORDER BY pos", (vm,)
        ).fetchall()
        return [MirrorRow(k, _text(v), ts, origin, hidden) for k, v, ts, origin, hidden in rows]

    def hidden(self, vm: str) -> set[str]:
        return {r[0] for r in self._run("SELECT key FROM hidden WHERE vm = %s", (vm,)).fetchall()}

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
        """As Store.save_mirror, in one statement. A hidden row is written without its value."""
        save = MirrorSave(vm, rows, deleted, replace, last_seen, gid, gseq, unhidden)
        self._write(_SAVE_MIRRORS_SQL, _mirrors_params([save]))

    def save_mirrors(self, saves: Sequence[MirrorSave]) -> dict[str, Exception]:
        """As Store.save_mirrors. Every VM's save in one statement, one round trip with its
        transaction: a statement a VM, each in its savepoint, would stop the bridge's loop a
        round trip each (hundreds a second under load). Should that statement fail (a VM's row
        locked past lock_timeout), each VM's save is made again alone, so that one VM's failure
        keeps none of the others from being saved."""
        if len(saves) > 1:
            try:
                with self.batch(savepoints=False):  # BEGIN, the statement, COMMIT: one trip
                    self._queue(_SAVE_MIRRORS_SQL.encode("utf-8"), _mirrors_params(saves))
                return {}
            except StoreError as e:
                # When the database is away, save_each()'s BEGIN fails at once the same way.
                log.info("saving %d mirrors at once failed, saving each alone: %s", len(saves), e)
        return save_each(self, saves)

    # -- the pool -------------------------------------------------------------------------------

    def register_host(self, url: str, lease: float) -> None:
        """This host's row (its API's ``url``), started and alive now; ``lease``: how old a
        heartbeat may be before its host counts as dead (for every judgement this store makes)."""
        self.lease = float(lease)
        self._write(
            f"INSERT INTO hosts (host, url, heartbeat, started) VALUES (%s, %s, {_NOW}, {_NOW}) "
            "ON CONFLICT (host) DO UPDATE SET url = EXCLUDED.url, heartbeat = EXCLUDED.heartbeat, "
            "started = EXCLUDED.started",
            (self.host, url),
        )
        self._url = url

    def heartbeat(self) -> None:
        """This host is alive now (the database's clock). Its row is made again if it was lost."""
        cur = self._write("UPDATE hosts SET heartbeat = %s WHERE host = %%s" % _NOW, (self.host,))
        if cur.rowcount == 0 and self._url is not None:
            self.register_host(self._url, self.lease)

    def release_dead(self) -> list[str]:
        """Release the placements of hosts whose heartbeat is older than the lease (never this
        host's), each announced on PLACEMENT_CHANNEL; the VMs released."""
        rows = self._write(
            _RELEASE_DEAD_SQL,
            {"me": self.host, "lease": self.lease, "channel": PLACEMENT_CHANNEL},
        ).fetchall()
        return [r[0] for r in rows]

    def claim(self, vm: str, force: bool = False) -> int | None:
        """Own ``vm`` (docs/pool.md, "Ownership and fencing"): when nobody does, this host does
        already, its owner's heartbeat is stale, or ``force``. The new fence (held from now on),
        or None when another live host owns it (nothing changed)."""
        self._drop_ahead(vm)
        row = self._write(
            _CLAIM_SQL,
            {
                "vm": vm,
                "me": self.host,
                "force": force,
                "lease": self.lease,
                "channel": PLACEMENT_CHANNEL,
            },
        ).fetchone()
        if row is None:
            return None
        fence = int(row[0])
        self._held[vm] = fence
        return fence

    def release(self, vm: str) -> bool:
        """Give ``vm`` up, when this host still holds its current fence; True if released."""
        self._drop_ahead(vm)
        fence = self._held.pop(vm, None)
        if fence is None:
            return False
        row = self._write(
            _RELEASE_SQL,
            {"vm": vm, "me": self.host, "fence": fence, "channel": PLACEMENT_CHANNEL},
        ).fetchone()
        return row is not None

    def mark_migrating(self, vm: str) -> bool:
        """Placement state "migrating", when this host holds ``vm``'s current fence."""
        self._drop_ahead(vm)
        fence = self._held.get(vm)
        if fence is None:
            return False
        cur = self._write(
            "UPDATE placement SET state = 'migrating', since = %s "
            "WHERE vm = %%s AND host = %%s AND fence = %%s::bigint" % _NOW,
            (vm, self.host, fence),
        )
        return cur.rowcount == 1

    def held(self, vm: str) -> int | None:
        """The fence this process holds for ``vm`` (None: it does not deliver it)."""
        return self._held.get(vm)

    def forget(self, vm: str) -> None:
        """Drop the fence held for ``vm`` (another host claimed it)."""
        self._drop_ahead(vm)
        self._held.pop(vm, None)

    def _lost(self, vm: str, fence: int) -> None:
        self._drop_ahead(vm)
        if self._held.get(vm) == fence:
            del self._held[vm]
            log.info("VM %r: fence %d is stale; another host delivers to it", vm, fence)

    def placement(self, vm: str) -> Placement | None:
        row = self._run(_PLACEMENT_SQL + " WHERE p.vm = %(vm)s", {"vm": vm, "lease": self.lease})
        found = row.fetchone()
        return None if found is None else Placement(*found)

    def placements(self) -> dict[str, Placement]:
        """Every VM's placement, with its owner's URL and liveness, in one query."""
        rows = self._run(_PLACEMENT_SQL, {"lease": self.lease}).fetchall()
        return {r[0]: Placement(*r) for r in rows}

    def hosts(self) -> list[HostRow]:
        rows = self._run(
            "SELECT host, url, heartbeat, started, heartbeat >= %s - %%s::float8 FROM hosts "
            "ORDER BY host" % _NOW,
            (self.lease,),
        ).fetchall()
        return [HostRow(*r) for r in rows]


def _last_writes(rows: list[MirrorRow]) -> list[MirrorRow]:
    """The last write of each key, at its place (as SQLite's INSERT OR REPLACE)."""
    latest: dict[str, MirrorRow] = {}
    for r in rows:
        latest.pop(r.key, None)
        latest[r.key] = r
    return list(latest.values())


def _mirrors_params(saves: Sequence[MirrorSave]) -> dict[str, list[Any]]:
    """_SAVE_MIRRORS_SQL's arrays (a hidden row without its value)."""
    p: dict[str, list[Any]] = {
        k: []
        for k in (
            "vms last_seens gids gseqs replaced r_vms keys values tss origins hiddens "
            "d_vms d_keys u_vms u_keys"
        ).split()
    }
    for m in saves:
        p["vms"].append(m.vm)
        p["last_seens"].append(m.last_seen)
        p["gids"].append(m.gid)
        p["gseqs"].append(m.gseq)
        if m.replace:
            p["replaced"].append(m.vm)
        for r in _last_writes(m.rows):
            p["r_vms"].append(m.vm)
            p["keys"].append(r.key)
            p["values"].append(None if r.hidden else _utf8(r.value))
            p["tss"].append(float(r.ts))
            p["origins"].append(r.origin)
            p["hiddens"].append(bool(r.hidden))
        p["d_vms"] += [m.vm] * len(m.deleted)
        p["d_keys"] += list(m.deleted)
        p["u_vms"] += [m.vm] * len(m.unhidden)
        p["u_keys"] += list(m.unhidden)
    return p


class _Alone:
    """PgStore.alone()'s block."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        if self._store._blocks or self._store._alone is not None:
            raise StoreError("alone() inside a transaction block or another alone()")
        self._store._alone = False

    def __exit__(self, *exc: object) -> Literal[False]:
        self._store._alone = None
        return False


class _Tx:
    """A transaction block on the store's connection: BEGIN ... COMMIT outside any, a savepoint
    inside one, its errors made StoreError.

    Round trips: the block runs in psycopg's pipeline mode, so that BEGIN, SAVEPOINT and
    RELEASE cost none of their own: each is sent at once without waiting for its answer, and
    that answer comes with the next statement's (_run syncs after each statement, so its
    result and error are its own), or with COMMIT's. A block of n statements thus costs n + 1
    round trips (COMMIT's Sync the last), as many savepoints as it holds. Its atomicity is
    the server's as before: a command that fails makes the server skip everything up to the
    next Sync, and the error surfaces at that Sync, at the latest the COMMIT's, which then
    fails the block. A COMMIT the server turned into a ROLLBACK (an error a caller caught and
    went on) fails the block too."""

    def __init__(self, store: PgStore, batch: bool = False) -> None:
        self._store = store
        self._batch = batch
        self._conn: psycopg.Connection[Any] | None = None
        # The outermost block's pipeline (entered here); a savepoint's name otherwise.
        self._pipeline_cm: AbstractContextManager[psycopg.Pipeline] | None = None
        self._savepoint: bytes | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        store = self._store
        conn = store._connection()
        if store._blocks:
            self._savepoint = b"s%d" % len(store._blocks)
            store._queue(b"SAVEPOINT " + self._savepoint)
        else:
            cm = conn.pipeline()
            try:
                store._pipeline = cm.__enter__()
                self._pipeline_cm = cm
                conn.execute(b"BEGIN")
            except psycopg.Error as e:
                failure = store._failure(e)
                self._close_pipeline(e)
                raise failure from e
        self._conn = conn
        store._blocks.append(self._batch)
        return conn

    def _close_pipeline(self, exc: BaseException | None) -> None:
        """Leave pipeline mode after a failure (its Sync may fail too: nothing to add)."""
        store, cm = self._store, self._pipeline_cm
        store._pipeline, self._pipeline_cm = None, None
        if cm is None:
            return
        try:
            cm.__exit__(type(exc) if exc else None, exc, None)
        except Exception:  # noqa: BLE001 - the failure being reported is the one that counts
            pass
        conn = self._conn or store._conn
        if conn is not None and not conn.closed and conn.pgconn.pipeline_status:
            store._drop()  # still in pipeline mode with results nobody will read: start afresh

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        store = self._store
        store._blocks.pop()
        conn = self._conn
        assert conn is not None
        if exc_type is not None:
            # What the block's enqueues read is undone with them (_note_ahead); the others' too,
            # which only costs them a read.
            store._ahead_pending.clear()
        if exc_type is None and (conn.closed or store._conn is not conn):
            # A statement of the block failed with the connection and its caller went on (a
            # group commit's unit): what the block did is gone, it must not look committed.
            if self._pipeline_cm is not None:
                store._commit_ahead(False)
                self._close_pipeline(None)
            raise StoreUnavailable(
                "the pool database is unreachable: the connection was lost in a transaction"
            )
        if self._savepoint is not None:
            try:
                if exc_type is not None:
                    store._queue(b"ROLLBACK TO SAVEPOINT " + self._savepoint)
                store._queue(b"RELEASE SAVEPOINT " + self._savepoint)
            except StoreError:
                if exc_type is None:
                    raise
                # Else the block's own error goes on; the outer block fails at its end.
            return False
        try:
            ended = conn.execute(b"COMMIT" if exc_type is None else b"ROLLBACK")
            cm, self._pipeline_cm = self._pipeline_cm, None
            store._pipeline = None
            assert cm is not None
            cm.__exit__(None, None, None)  # the Sync, and every answer not read yet
        except psycopg.Error as e:
            store._commit_ahead(False)
            failure = store._failure(e)
            self._close_pipeline(e)
            if conn is store._conn and conn.pgconn.transaction_status != TransactionStatus.IDLE:
                store._drop()  # a block left open or aborted: never carry on inside it
            if exc_type is None:
                raise failure from e
            return False  # the block's own error goes on
        committed = exc_type is None and ended.statusmessage == "COMMIT"
        store._commit_ahead(committed)
        if exc_type is None and not committed:
            raise StoreError(
                "the pool database failed: the transaction was rolled back (%s)"
                % ended.statusmessage
            )
        return False
