#!/usr/bin/env python3
"""What a pool of 1,000 hosts x 100 VMs asks of its PostgreSQL database, measured on a private
cluster: the numbers behind docs/fleet.md.

    .venv/bin/python bench/pg_fleet.py              # 3 rounds, ~95 s
    .venv/bin/python bench/pg_fleet.py --quick      # 1 round, short windows, ~22 s
    .venv/bin/python bench/pg_fleet.py --json out.json

The cluster is the tests' own (tests/support/postgres.py: a temporary directory, a unix socket,
fsync and synchronous_commit on), with max_connections raised to hold the listeners and
autovacuum_naptime 1 s so that autovacuum acts within a run. The schema is docs/pool.md's: vms,
placement (100,000 VMs on 1,000 hosts, 100 each), hosts, and the outbox twice: one table, and the
same hash-partitioned by vm into 16.

1. Memory of a backend (/proc/PID/smaps_rollup): idle (after SELECT 1), listening (LISTEN on the
   placement channel and a host's channel), and a bridge's store connection (50 send cycles, a
   heartbeat, a read of every placement). RSS, PSS, USS (private pages) and page tables: a
   backend's own cost is its USS and page tables, the rest of its RSS is shared memory.
2. Reading every placement (100,000 rows, psycopg fetchall), as a bridge's refresh does, beside
   reading one host's 100.
3. NOTIFY: 1, 50 and 200 connections LISTEN on one shared channel (every notification goes to all
   of them), then 200 each on a channel of its own (a notification goes to one; docs/pool.md's
   per-host channels). Sequential: one pg_notify committed at a time, the next once every listener
   has it (latency from sending the statement to the last receipt). Loaded: 4 senders, each
   sending again once its previous notification reached every listener (a closed loop: nothing
   piles up). Per notification: the server's CPU, the listening backends' CPU and context
   switches (how many of them woke up).
4. Small commits (a one-row INSERT, autocommit: one round trip, one WAL flush) from 1, 4, 16 and
   64 connections, plain and with a pg_notify in the same transaction (no listener: the cost of
   NOTIFY's cluster-wide commit lock alone).
5. The outbox's churn: 4 connections, each a bridge cycling over its own VMs: enqueue (one
   statement: vms.seq + 1 and the outbox row) then finish (delete the row, fenced on placement),
   two transactions a cycle; one table vs 16 hash partitions, rounds interleaved. Then each
   layout's size, dead tuples (pgstattuple) and autovacuum runs.

Every statement is a prepared statement driven without blocking from one selector loop (libpq
through psycopg's pq layer), so that Python threads and the GIL do not sit between the clock and
the socket. The client is one Python process on the same cores as the server: its CPU is shown
beside each loaded figure. Rounds interleave the variants, the order alternating; the summary
gives the median of the rounds. Every wait has a deadline; the run stops past --limit seconds.
"""

import argparse
import json
import os
import random
import re
import selectors
import signal
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support from this tree

import psycopg
from psycopg import pq, sql

from tests.support.postgres import ROLE, SUPERUSER, PostgresCluster

HOSTS = 1000
VMS_PER_HOST = 100
VMS = HOSTS * VMS_PER_HOST
PARTITIONS = 16
LISTENERS = 200  # the most listening connections measured
SENDERS = 4  # notify senders in the loaded NOTIFY figure
COMMIT_CONNS = (1, 4, 16, 64)
CHURNERS = 4
MAX_CONNECTIONS = 320
PLACEMENT_CHANNEL = "ovmd_placement"
VALUE = "v" * 64  # a small message's value
TICK = os.sysconf("SC_CLK_TCK")
CLOCK = time.perf_counter
IDLE_AFTER = 3.0  # seconds between the two looks at the outbox's size
DEADLINE = 10.0  # seconds any single statement or notification may take before the run fails

TEXT, INT8, FLOAT8 = 25, 20, 701
OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)

OUTBOX_COLUMNS = (
    "vm text NOT NULL, seq bigint NOT NULL, key text NOT NULL, value text, log boolean NOT NULL,"
    " created double precision NOT NULL, audit_id bigint, expires double precision,"
    " withdrawn text, PRIMARY KEY (vm, seq)"
)
SCHEMA = [
    "CREATE TABLE vms (name text PRIMARY KEY, epoch text NOT NULL, seq bigint NOT NULL DEFAULT 0)",
    "CREATE TABLE hosts (host text PRIMARY KEY, url text NOT NULL,"
    " heartbeat timestamptz NOT NULL, started timestamptz NOT NULL)",
    "CREATE TABLE placement (vm text PRIMARY KEY, host text, fence bigint NOT NULL,"
    " state text NOT NULL, since double precision NOT NULL)",
    "CREATE INDEX placement_host ON placement (host)",
    "CREATE TABLE outbox_one (%s)" % OUTBOX_COLUMNS,
    "CREATE INDEX outbox_one_expires ON outbox_one (expires) WHERE expires IS NOT NULL",
    "CREATE TABLE outbox_hash (%s) PARTITION BY HASH (vm)" % OUTBOX_COLUMNS,
    "CREATE INDEX outbox_hash_expires ON outbox_hash (expires) WHERE expires IS NOT NULL",
    "CREATE TABLE commits (id bigserial PRIMARY KEY, vm text NOT NULL,"
    " ts double precision NOT NULL)",
] + [
    "CREATE TABLE outbox_hash_p%02d PARTITION OF outbox_hash FOR VALUES WITH (MODULUS %d,"
    " REMAINDER %d)" % (i, PARTITIONS, i)
    for i in range(PARTITIONS)
]
FILL = [
    "INSERT INTO vms SELECT 'vm-' || lpad(i::text, 6, '0'), md5(i::text), 0"
    " FROM generate_series(0, %d) i" % (VMS - 1),
    "INSERT INTO hosts SELECT 'hv' || lpad(i::text, 4, '0'), 'https://hv' || i || ':8443',"
    " clock_timestamp(), clock_timestamp() FROM generate_series(0, %d) i" % (HOSTS - 1),
    "INSERT INTO placement SELECT 'vm-' || lpad(i::text, 6, '0'),"
    " 'hv' || lpad((i / %d)::text, 4, '0'), 1, 'running', extract(epoch from now())"
    " FROM generate_series(0, %d) i" % (VMS_PER_HOST, VMS - 1),
]

# name -> (statement, parameter types): every Link prepares them all.
STATEMENTS = {
    "notify": ("SELECT pg_notify($1, $2)", [TEXT, TEXT]),
    "commit": ("INSERT INTO commits (vm, ts) VALUES ($1, $2)", [TEXT, FLOAT8]),
    "commit_notify": (
        "WITH i AS (INSERT INTO commits (vm, ts) VALUES ($1, $2) RETURNING vm)"
        " SELECT pg_notify($3, vm) FROM i",
        [TEXT, FLOAT8, TEXT],
    ),
    "heartbeat": ("UPDATE hosts SET heartbeat = clock_timestamp() WHERE host = $1", [TEXT]),
}
for _layout in ("one", "hash"):
    # A send: the VM's next seq and its outbox row in one statement (one transaction).
    STATEMENTS["enq_" + _layout] = (
        "WITH s AS (UPDATE vms SET seq = seq + 1 WHERE name = $1 RETURNING seq)"
        " INSERT INTO outbox_%s (vm, seq, key, value, log, created)"
        " SELECT $1, s.seq, $2, $3, true, $4 FROM s RETURNING seq" % _layout,
        [TEXT, TEXT, TEXT, FLOAT8],
    )
    # Its acknowledgement: the row goes, only while this host holds the VM's fence.
    STATEMENTS["fin_" + _layout] = (
        "DELETE FROM outbox_%s o USING placement p WHERE o.vm = $1 AND o.seq = $2"
        " AND p.vm = o.vm AND p.host = $3 AND p.fence = $4" % _layout,
        [TEXT, INT8, TEXT, INT8],
    )


def vm_name(i):
    return "vm-%06d" % i


def host_name(i):
    return "hv%04d" % i


def host_channel(i):
    return "ovmd_host_" + host_name(i)


def nearest_rank(values, q):
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(q * len(s) + 0.5) - 1))]


def ms(values, q):
    return nearest_rank(values, q) * 1e3 if values else float("nan")


class FleetCluster(PostgresCluster):
    """The tests' private cluster, with room for the listeners and an autovacuum that looks every
    second (the default minute would never come within a run)."""

    def command(self):
        return super().command() + [
            "-c",
            "max_connections=%d" % MAX_CONNECTIONS,
            "-c",
            "autovacuum_naptime=1s",
        ]


class Link:
    """One connection driven without blocking from a selector loop: at most one statement in
    flight, its result read when the socket says so."""

    def __init__(self, conninfo):
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.pg = self.conn.pgconn
        self.fd = self.pg.socket
        self.pid = self.pg.backend_pid
        self.busy = False
        self.sent_at = 0.0
        self.state = None  # the driver's business
        self.step = None
        self._result = None
        for name, (text, types) in STATEMENTS.items():
            check(self.pg.prepare(name.encode(), text.encode(), types))

    def send(self, name, params):
        self.sent_at = CLOCK()
        self.busy = True
        self.pg.send_query_prepared(
            name.encode(), [None if p is None else str(p).encode() for p in params]
        )

    def read(self):
        """The completed statement's result, or None while it is not complete."""
        self.pg.consume_input()
        if not self.busy:
            return None
        while not self.pg.is_busy():
            r = self.pg.get_result()
            if r is None:
                done, self._result = self._result, None
                self.busy = False
                if done is None:
                    raise RuntimeError("a statement ended without a result")
                return done
            check(r)
            self._result = r
        return None

    def run(self, name, params):
        """Send and wait (outside the measured windows)."""
        self.send(name, params)
        return self.finish()

    def finish(self):
        """Wait for the statement in flight; its result (None if there was none)."""
        end = CLOCK() + DEADLINE
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while self.busy:
                r = self.read()
                if r is not None:
                    return r
                if CLOCK() > end:
                    raise RuntimeError("a statement took more than %.0f s" % DEADLINE)
                sel.select(0.5)
        return None

    def close(self):
        self.conn.close()


class Listener:
    """A listening connection: LISTEN on one channel, notifications read without blocking."""

    def __init__(self, conninfo, index):
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.pg = self.conn.pgconn
        self.fd = self.pg.socket
        self.pid = self.pg.backend_pid
        self.index = index  # its host: its own channel is host_channel(index)
        self.channel = None

    def listen(self, channel):
        if self.channel == channel:
            return
        self.conn.execute("UNLISTEN *")
        if channel is not None:
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.channel = channel

    def drain(self):
        self.pg.consume_input()
        out: list[bytes] = []
        while True:
            n = self.pg.notifies()
            if n is None:
                return out
            out.append(n.extra)

    def close(self):
        self.conn.close()


def check(r):
    if r.status not in OK:
        # The server's message names the statement's fault, never a row's value.
        raise RuntimeError("statement failed: %s" % r.error_message.decode("utf-8", "replace"))


# -- what /proc says -------------------------------------------------------------------------


def cpu_ticks(pids):
    out = {}
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return out


def ticks_delta(before, after):
    return sum(t - before.get(pid, 0) for pid, t in after.items())


def ctx_switches(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def memory_of(pid):
    """kB: Rss, Pss, Uss (private clean + dirty) from smaps_rollup; Pte (page tables) from
    status."""
    fields = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmPTE:"):
                fields["VmPTE"] = int(line.split()[1])
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "pte": fields.get("VmPTE", 0),
    }


# -- the figures ------------------------------------------------------------------------------


def memory_figures(conninfo, count, cycles):
    """Per kind of connection: medians over `count` backends. A backend's own cost is its USS
    (private pages) and its page tables; the rest of its RSS is the cluster's shared memory
    (shared_buffers and the like), paid once however many backends map it."""
    out = {}
    for kind in ("idle", "listen", "store"):
        conns, pids, connect_s = [], [], []
        try:
            for k in range(count):
                t = CLOCK()
                conn = psycopg.connect(conninfo, autocommit=True)
                connect_s.append(CLOCK() - t)
                conns.append(conn)
                pids.append(conn.info.backend_pid)
                if kind == "idle":
                    conn.execute("SELECT 1")
                elif kind == "listen":
                    conn.execute("LISTEN %s" % PLACEMENT_CHANNEL)
                    conn.execute("LISTEN %s" % host_channel(k))
                else:
                    bridge_work(conn, k, cycles)
            time.sleep(0.3)
            per = [memory_of(pid) for pid in pids]
        finally:
            for conn in conns:
                conn.close()
        out[kind] = {key: statistics.median(p[key] for p in per) for key in per[0]}
        out[kind]["connect_ms"] = statistics.median(connect_s) * 1e3
        time.sleep(0.2)
    return out


def bridge_work(conn, host, cycles):
    """What a bridge's store connection does, through psycopg as hostbridge's store would
    (prepared after 5 runs): sends and their acknowledgements, a heartbeat, a read of every
    placement."""
    enq = to_psycopg(STATEMENTS["enq_one"][0])
    fin = to_psycopg(STATEMENTS["fin_one"][0])
    for j in range(cycles):
        i = host * VMS_PER_HOST + j % VMS_PER_HOST
        row = conn.execute(enq, numbered(vm_name(i), "k%d" % j, VALUE, time.time())).fetchone()
        conn.execute(fin, numbered(vm_name(i), row[0], host_name(host), 1))
    conn.execute(to_psycopg(STATEMENTS["heartbeat"][0]), numbered(host_name(host)))
    conn.execute("SELECT vm, host, fence, state, since FROM placement").fetchall()


def to_psycopg(statement):
    """$1... placeholders as psycopg's named %(pN)s ones (a $N may come twice)."""
    return re.sub(r"\$(\d+)", lambda m: "%%(p%s)s" % m.group(1), statement)


def numbered(*args):
    return {"p%d" % (k + 1): v for k, v in enumerate(args)}


def value(conn, query):
    row = conn.execute(query).fetchone()
    if row is None:
        raise RuntimeError("a query returned no row")
    return row[0]


def placement_read(conninfo, reads):
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT vm, host, fence, state, since FROM placement").fetchall()  # warm
        wall, cpu = [], []
        pid = conn.info.backend_pid
        backend0 = cpu_ticks([pid])
        for _ in range(reads):
            c, t = time.process_time(), CLOCK()
            rows = conn.execute("SELECT vm, host, fence, state, since FROM placement").fetchall()
            wall.append(CLOCK() - t)
            cpu.append(time.process_time() - c)
        backend_ms = ticks_delta(backend0, cpu_ticks([pid])) / TICK / reads * 1e3
        plan = value(
            conn,
            "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON)"
            " SELECT vm, host, fence, state, since FROM placement",
        )
        server_ms = plan[0]["Execution Time"]
        size = value(
            conn,
            "SELECT sum(octet_length(vm) + coalesce(octet_length(host), 0) + 8"
            " + octet_length(state) + 8) FROM placement",
        )
        one = []
        for k in range(reads * 10):
            t = CLOCK()
            conn.execute(
                "SELECT vm, host, fence, state, since FROM placement WHERE host = %s",
                (host_name(k),),
                prepare=True,
            ).fetchall()
            one.append(CLOCK() - t)
    return {
        "rows": len(rows),
        "mb": size / 1e6,
        "all_ms": statistics.median(wall) * 1e3,
        "all_client_cpu_ms": statistics.median(cpu) * 1e3,
        "all_server_exec_ms": server_ms,
        "all_backend_cpu_ms": backend_ms,
        "one_host_ms": statistics.median(one) * 1e3,
    }


def settle(listeners, quiet=0.05):
    """Read and drop whatever the listeners still have, until nothing came for `quiet` s."""
    with selectors.DefaultSelector() as sel:
        for lst in listeners:
            sel.register(lst.fd, selectors.EVENT_READ, lst)
        end = CLOCK() + DEADLINE
        while CLOCK() < end:
            events = sel.select(quiet)
            if not events:
                return
            for key, _ in events:
                key.data.drain()


def setup_listeners(all_listeners, mode, n):
    """`n` listeners on the shared channel, or on their own; the others listen on nothing."""
    for lst in all_listeners[n:]:
        lst.listen(None)
    used = all_listeners[:n]
    for lst in used:
        lst.listen(PLACEMENT_CHANNEL if mode == "shared" else host_channel(lst.index))
    settle(all_listeners)
    return used


def notify_target(mode, used, k):
    """(channel, receipts expected) of the k-th notification."""
    if mode == "shared":
        return PLACEMENT_CHANNEL, len(used)
    return host_channel(used[k % len(used)].index), 1


def notify_sequential(sender, used, mode, count):
    """One notification at a time; the next once every listener got it. Seconds from sending
    the statement to the first and to the last receipt."""
    first, last = [], []
    with selectors.DefaultSelector() as sel:
        sel.register(sender.fd, selectors.EVENT_READ, None)
        for lst in used:
            sel.register(lst.fd, selectors.EVENT_READ, lst)
        for k in range(count):
            channel, expect = notify_target(mode, used, k)
            payload = str(k).encode()
            sender.send("notify", [channel, k])
            t0 = sender.sent_at
            got, t_first, t_last = 0, None, None
            while got < expect or sender.busy:
                events = sel.select(1.0)
                if CLOCK() - t0 > DEADLINE:
                    raise RuntimeError("a notification did not reach every listener in time")
                for key, _ in events:
                    lst = key.data
                    if lst is None:
                        sender.read()
                        continue
                    for p in lst.drain():
                        now = CLOCK()
                        if p != payload:
                            raise RuntimeError("a notification arrived out of turn")
                        got += 1
                        t_first = t_first or now
                        t_last = now
            first.append(t_first - t0)
            last.append(t_last - t0)
    return {
        "first_p50_ms": ms(first, 0.5),
        "last_p50_ms": ms(last, 0.5),
        "last_p99_ms": ms(last, 0.99),
    }


def notify_loaded(cluster, senders, used, mode, seconds):
    """Each sender sends again once its previous statement completed and its notification
    reached every listener (a closed loop: nothing piles up); figures over the window."""
    pending = {}  # payload -> [sender, t0, receipts left]
    done_times, receipts = [], []
    listener_pids = [lst.pid for lst in used]
    serial = [0]
    by_fd = {s.fd: s for s in senders}
    end = 0.0

    def fire(s, now):
        # s.state: the payload of its notification still on its way to the listeners.
        if s.busy or s.state is not None or now >= end:
            return
        k = serial[0]
        serial[0] += 1
        channel, expect = notify_target(mode, used, k)
        s.send("notify", [channel, k])
        s.state = str(k).encode()
        pending[s.state] = [s, s.sent_at, expect]

    with selectors.DefaultSelector() as sel:
        for s in senders:
            sel.register(s.fd, selectors.EVENT_READ, None)
            s.state = None
        for lst in used:
            sel.register(lst.fd, selectors.EVENT_READ, lst)
        cpu0, lcpu0, ctx0 = (
            cpu_ticks(cluster.processes()),
            cpu_ticks(listener_pids),
            ctx_switches(listener_pids),
        )
        client0 = time.process_time()
        start = CLOCK()
        end = start + seconds
        for s in senders:
            fire(s, start)
        while pending or any(s.busy for s in senders):
            if CLOCK() > end + DEADLINE:
                raise RuntimeError("notifications still missing 10 s after the window")
            for key, _ in sel.select(0.5):
                lst = key.data
                if lst is None:
                    s = by_fd[key.fd]
                    if s.read() is not None:
                        fire(s, CLOCK())
                    continue
                for p in lst.drain():
                    now = CLOCK()
                    entry = pending.get(p)
                    if entry is None:
                        raise RuntimeError("a notification nobody sent")
                    receipts.append(now - entry[1])
                    entry[2] -= 1
                    if entry[2] == 0:
                        del pending[p]
                        if now <= end:
                            done_times.append(now)
                        s = entry[0]
                        s.state = None
                        fire(s, now)
        wall = CLOCK() - start
        client = time.process_time() - client0
        cpu1, lcpu1, ctx1 = (
            cpu_ticks(cluster.processes()),
            cpu_ticks(listener_pids),
            ctx_switches(listener_pids),
        )
    n = len(done_times)
    if n == 0:
        raise RuntimeError("no notification completed in the window")
    expect = notify_target(mode, used, 0)[1]
    return {
        "notifies_per_s": n / seconds,
        "deliveries_per_s": n * expect / seconds,
        "p50_ms": ms(receipts, 0.5),
        "p99_ms": ms(receipts, 0.99),
        "server_cpu_us": ticks_delta(cpu0, cpu1) / TICK / serial[0] * 1e6,
        "listener_cpu_us": ticks_delta(lcpu0, lcpu1) / TICK / serial[0] * 1e6,
        "listener_wakeups": (ctx1 - ctx0) / serial[0],
        "client_cpu_pct": client / wall * 100,
    }


def drive(cluster, links, steps, seconds):
    """Keep one statement in flight on each link for `seconds`: steps[i](link, result, more)
    gives link i's next (name, params), or None. Statements completed in the window, their
    latencies, the server's and the client's CPU."""
    latencies = []
    total = 0  # statements completed, in the window or after it
    with selectors.DefaultSelector() as sel:
        for link, step in zip(links, steps):
            link.step = step
            sel.register(link.fd, selectors.EVENT_READ, link)
        cpu0 = cpu_ticks(cluster.processes())
        client0 = time.process_time()
        start = CLOCK()
        end = start + seconds
        for link in links:
            op = link.step(link, None, True)
            if op is not None:
                link.send(*op)
        while any(link.busy for link in links):
            if CLOCK() > end + DEADLINE:
                raise RuntimeError("statements still in flight 10 s after the window")
            for key, _ in sel.select(0.5):
                link = key.data
                r = link.read()
                if r is None:
                    continue
                now = CLOCK()
                total += 1
                if now <= end:
                    latencies.append(now - link.sent_at)
                op = link.step(link, r, now < end)
                if op is not None:
                    link.send(*op)
        client = time.process_time() - client0
        cpu1 = cpu_ticks(cluster.processes())
    n = len(latencies)
    return {
        "per_s": n / seconds,
        "p50_ms": ms(latencies, 0.5),
        "p99_ms": ms(latencies, 0.99),
        "server_cpu_us": ticks_delta(cpu0, cpu1) / TICK / max(n, 1) * 1e6,
        "client_cpu_pct": client / seconds * 100,
        "total": total,
    }


def commit_step(kind):
    def step(link, result, more):
        if not more:
            return None
        if kind == "plain":
            return "commit", [vm_name(link.pid % VMS), time.time()]
        return "commit_notify", [vm_name(link.pid % VMS), time.time(), host_channel(0)]

    return step


def churn_step(layout, churner, churners):
    """A bridge's send/ack cycle over its own VMs (those whose index is `churner` mod
    `churners`): enqueue, then finish the row the enqueue made."""
    own = range(churner, VMS, churners)
    enq, fin = "enq_" + layout, "fin_" + layout

    def step(link, result, more):
        if result is not None and link.state is not None:
            i, seq = link.state
            if seq is None:  # the enqueue returned the row's seq: finish it, window or not
                seq = int(result.get_value(0, 0))
                link.state = (i, seq)
                return fin, [vm_name(i), seq, host_name(i // VMS_PER_HOST), 1]
            if result.command_tuples != 1:
                raise RuntimeError("a finish removed %s rows, not 1" % result.command_tuples)
        link.state = None
        if not more:
            return None
        i = random.choice(own)
        link.state = (i, None)
        return enq, [vm_name(i), "k%d" % i, VALUE, time.time()]

    return step


def outbox_sizes(admin, layout):
    pattern = "^outbox_one$" if layout == "one" else "^outbox_hash_p"
    tables = [
        r[0]
        for r in admin.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ %s", (pattern,)
        )
    ]
    table = index = dead = live = 0
    for t in tables:
        row = admin.execute(
            "SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass),"
            " dead_tuple_count, tuple_count FROM pgstattuple(%s::regclass)",
            (t, t, t),
        ).fetchone()
        table += row[0]
        index += row[1]
        dead += row[2]
        live += row[3]
    stats = admin.execute(
        "SELECT coalesce(sum(autovacuum_count), 0), coalesce(sum(n_tup_del), 0)"
        " FROM pg_stat_user_tables WHERE relname ~ %s",
        (pattern,),
    ).fetchone()
    return {
        "table_kb": table / 1024,
        "index_kb": index / 1024,
        "dead": dead,
        "live": live,
        "autovacuums": int(stats[0]),
        "deleted": int(stats[1]),
    }


def fdatasync_p50_us(directory, count=300):
    """The floor under every commit: an 8 KiB overwrite + fdatasync in an allocated file, on the
    cluster's file system."""
    path = os.path.join(directory, "fdatasync.probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        block = os.urandom(8192)
        os.pwrite(fd, block * 16, 0)
        os.fsync(fd)
        samples = []
        for i in range(count):
            t = CLOCK()
            os.pwrite(fd, block, (i % 16) * 8192)
            os.fdatasync(fd)
            samples.append(CLOCK() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return nearest_rank(samples, 0.5) * 1e6


def median_of(values):
    """The median of the figures that exist (a window without latencies has NaN ones)."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, short windows")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--limit", type=float, default=0, help="stop past this many seconds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
        window, churn_window, sequential, mem_count, mem_cycles, reads = 0.8, 1.5, 40, 6, 20, 3
    else:
        window, churn_window, sequential, mem_count, mem_cycles, reads = 1.5, 4.0, 150, 12, 50, 5
    if args.rounds < 1:
        parser.error("at least 1 round")
    limit = args.limit or (90 if args.quick else 240)

    def too_long(signum, frame):
        raise RuntimeError("the run took more than %.0f s; stopped" % limit)

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(limit))
    began = CLOCK()
    random.seed(1)

    cluster = FleetCluster()
    conns = []
    results: dict[str, Any] = {"rounds": []}
    try:
        conninfo = cluster.conninfo
        admin = psycopg.connect(cluster.conninfo_for(user=SUPERUSER), autocommit=True)
        conns.append(admin)
        admin.execute("CREATE EXTENSION pgstattuple")
        with psycopg.connect(conninfo, autocommit=True) as c:
            for s in SCHEMA + FILL:
                c.execute(s)
            c.execute("VACUUM ANALYZE")
        settings: dict[str, str] = dict(
            admin.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN"
                " ('server_version', 'shared_buffers', 'max_connections', 'wal_sync_method',"
                " 'autovacuum_naptime', 'huge_pages', 'synchronous_commit')"
            ).fetchall()
        )
        print(
            "PostgreSQL %s (role %s, unix socket), psycopg %s (libpq %d), %s"
            % (
                settings["server_version"],
                ROLE,
                psycopg.__version__,
                pq.version(),
                os.path.realpath(sys.executable),
            )
        )
        print(
            "shared_buffers %s (8kB pages), max_connections %s, synchronous_commit %s,"
            " wal_sync_method %s, autovacuum_naptime %s, huge_pages %s; %d CPUs, load %s"
            % (
                settings["shared_buffers"],
                settings["max_connections"],
                settings["synchronous_commit"],
                settings["wal_sync_method"],
                settings["autovacuum_naptime"],
                settings["huge_pages"],
                os.cpu_count() or 0,
                " ".join(open("/proc/loadavg").read().split()[:3]),
            )
        )
        print(
            "8 KiB write + fdatasync on its file system: p50 %.0f us"
            % fdatasync_p50_us(cluster.dir)
        )
        print(
            "schema: %d VMs on %d hosts; outbox one table and %d hash partitions; %d rounds"
            % (VMS, HOSTS, PARTITIONS, args.rounds)
        )

        memory = memory_figures(conninfo, mem_count, mem_cycles)
        results["memory"] = memory
        print()
        print("1. one backend's memory (median of %d backends, kB)" % mem_count)
        print("   kind       RSS     PSS     USS  page tables  USS + page tables  connect ms")
        for kind, m in memory.items():
            print(
                "   %-6s %7.0f %7.0f %7.0f %12.0f %18.0f %11.1f"
                % (
                    kind,
                    m["rss"],
                    m["pss"],
                    m["uss"],
                    m["pte"],
                    m["uss"] + m["pte"],
                    m["connect_ms"],
                )
            )

        placement = placement_read(conninfo, reads)
        results["placement"] = placement
        print()
        print(
            "2. every placement (%d rows, ~%.1f MB of values): %.0f ms (client CPU %.0f ms,"
            " backend CPU %.0f ms, of which the plan's execution %.0f ms); one host's %d: %.2f ms"
            % (
                placement["rows"],
                placement["mb"],
                placement["all_ms"],
                placement["all_client_cpu_ms"],
                placement["all_backend_cpu_ms"],
                placement["all_server_exec_ms"],
                VMS_PER_HOST,
                placement["one_host_ms"],
            )
        )

        listeners = []
        for j in range(LISTENERS):
            listeners.append(Listener(conninfo, j))
        conns.extend(lst.conn for lst in listeners)
        senders = [Link(conninfo) for _ in range(SENDERS)]
        committers = [Link(conninfo) for _ in range(max(COMMIT_CONNS))]
        churners = [Link(conninfo) for _ in range(CHURNERS)]
        conns.extend(link.conn for link in senders + committers + churners)
        notify_cases = [("shared", 1), ("shared", 50), ("shared", 200), ("own", 200)]
        commit_cases = [(kind, n) for n in COMMIT_CONNS for kind in ("plain", "notify")]
        churn_cases = ["one", "hash"]
        churn_cycles = dict.fromkeys(churn_cases, 0)
        print()
        for r in range(args.rounds):
            flip = (lambda seq: seq) if r % 2 == 0 else (lambda seq: seq[::-1])
            rnd: dict[str, dict[str, Any]] = {"notify": {}, "commit": {}, "churn": {}}
            for mode, n in flip(notify_cases):
                used = setup_listeners(listeners, mode, n)
                seq_fig = notify_sequential(senders[0], used, mode, sequential)
                loaded = notify_loaded(cluster, senders, used, mode, window)
                rnd["notify"]["%s-%d" % (mode, n)] = {**seq_fig, **loaded}
            setup_listeners(listeners, "shared", 0)
            for kind, n in flip(commit_cases):
                rnd["commit"]["%s-%d" % (kind, n)] = drive(
                    cluster, committers[:n], [commit_step(kind)] * n, window
                )
            for layout in flip(churn_cases):
                steps = [churn_step(layout, k, CHURNERS) for k in range(CHURNERS)]
                lsn = value(admin, "SELECT pg_current_wal_lsn()")
                fig = drive(cluster, churners, steps, churn_window)
                wal = value(admin, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '%s')" % lsn)
                fig["cycles_per_s"] = fig["per_s"] / 2
                fig["wal_bytes_per_cycle"] = float(wal) / (fig["total"] / 2)
                churn_cycles[layout] += int(fig["cycles_per_s"] * churn_window)
                rnd["churn"][layout] = fig
            results["rounds"].append(rnd)
            print(
                "round %d done (%.0f s): notify shared-200 %.0f/s, commits 16 conns %.0f/s,"
                " churn one %.0f/s hash %.0f/s"
                % (
                    r + 1,
                    CLOCK() - began,
                    rnd["notify"]["shared-200"]["notifies_per_s"],
                    rnd["commit"]["plain-16"]["per_s"],
                    rnd["churn"]["one"]["cycles_per_s"],
                    rnd["churn"]["hash"]["cycles_per_s"],
                )
            )
        sizes = {layout: outbox_sizes(admin, layout) for layout in churn_cases}
        time.sleep(IDLE_AFTER)  # does autovacuum catch up once the churn stops?
        later = {layout: outbox_sizes(admin, layout) for layout in churn_cases}
        results["outbox"] = {"at_end": sizes, "after_idle": later}
    finally:
        signal.alarm(0)
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
        cluster.close()

    rounds = results["rounds"]
    summary: dict[str, dict[str, Any]] = {"notify": {}, "commit": {}, "churn": {}}
    for part in summary:
        for case in rounds[0][part]:
            summary[part][case] = {
                k: median_of(rd[part][case][k] for rd in rounds) for k in rounds[0][part][case]
            }
    results["median"] = summary
    # A window in which nothing completed (the machine or its disk stalled longer than the
    # window) has no latencies: the medians above leave it out, and it is counted here.
    stalled = [
        "round %d %s %s" % (i + 1, part, case)
        for i, rd in enumerate(rounds)
        for part in ("commit", "churn")
        for case, f in rd[part].items()
        if f["per_s"] == 0
    ]
    results["stalled"] = stalled

    print()
    print("3. NOTIFY, median of %d rounds" % len(rounds))
    print(
        "   listeners         sequential (ms)       | %d senders, closed loop: notifies/s"
        "  deliveries/s  receipt p50/p99 ms | per notify: server CPU us, listeners' CPU us,"
        " listener wakeups | client CPU" % SENDERS
    )
    for case, f in summary["notify"].items():
        print(
            "   %-11s first %5.2f last %5.2f p99 %5.2f | %8.0f %10.0f %8.2f %7.2f"
            " | %8.0f %8.0f %6.1f | %3.0f%%"
            % (
                case,
                f["first_p50_ms"],
                f["last_p50_ms"],
                f["last_p99_ms"],
                f["notifies_per_s"],
                f["deliveries_per_s"],
                f["p50_ms"],
                f["p99_ms"],
                f["server_cpu_us"],
                f["listener_cpu_us"],
                f["listener_wakeups"],
                f["client_cpu_pct"],
            )
        )
    print()
    print(
        "4. small commits (one-row INSERT, one round trip each), median of %d rounds" % len(rounds)
    )
    print("   conns  kind       commits/s   p50 ms   p99 ms   server CPU us/commit  client CPU")
    for n in COMMIT_CONNS:
        for kind in ("plain", "notify"):
            f = summary["commit"]["%s-%d" % (kind, n)]
            print(
                "   %5d  %-8s %11.0f %8.2f %8.2f %16.0f %10.0f%%"
                % (
                    n,
                    kind,
                    f["per_s"],
                    f["p50_ms"],
                    f["p99_ms"],
                    f["server_cpu_us"],
                    f["client_cpu_pct"],
                )
            )
    print()
    print(
        "5. outbox churn, %d connections (send + finish = 2 transactions a cycle), median of %d"
        " rounds" % (CHURNERS, len(rounds))
    )
    print(
        "   layout  cycles/s  tx p50 ms  tx p99 ms  server CPU us/tx  WAL bytes/cycle  client CPU"
    )
    for layout in churn_cases:
        f = summary["churn"][layout]
        print(
            "   %-6s %9.0f %10.2f %10.2f %16.0f %16.0f %10.0f%%"
            % (
                layout,
                f["cycles_per_s"],
                f["p50_ms"],
                f["p99_ms"],
                f["server_cpu_us"],
                f["wal_bytes_per_cycle"],
                f["client_cpu_pct"],
            )
        )
    print(
        "   its tables after %s cycles (one/hash), at the end of the last window and %.0f s later:"
        % ("/".join("%d" % churn_cycles[x] for x in churn_cases), IDLE_AFTER)
    )
    print("   layout  when    table kB  indexes kB  dead rows  live rows  autovacuums")
    for layout in churn_cases:
        for when, snap in (("end", sizes), ("later", later)):
            z = snap[layout]
            print(
                "   %-6s  %-5s %10.0f %11.0f %10d %10d %12d"
                % (
                    layout,
                    when,
                    z["table_kb"],
                    z["index_kb"],
                    z["dead"],
                    z["live"],
                    z["autovacuums"],
                )
            )
    if stalled:
        print()
        print("windows in which nothing completed: %s" % ", ".join(stalled))
    print()
    print("total %.0f s" % (CLOCK() - began))
    if args.json:
        results["churn_cycles"] = churn_cycles
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
