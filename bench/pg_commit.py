#!/usr/bin/env python3
"""Durable commit cost: PostgreSQL (the pool's shared database to come) beside SQLite (the bridge's
store today), sequential one-row INSERT transactions, side by side in the same run.

    .venv/bin/python bench/pg_commit.py              # 5 rounds of 2,000 commits a side
    .venv/bin/python bench/pg_commit.py --quick      # 3 rounds of 300
    .venv/bin/python bench/pg_commit.py --json out.json

PostgreSQL: the tests' own cluster (tests/support/postgres.py: a temporary directory, fsync and
synchronous_commit on, Debian's server), reached by psycopg over its unix socket; each commit is
BEGIN, INSERT, COMMIT (three round trips, one WAL flush), as a bridge would write one send.
SQLite: a file in a temporary directory on the same file system, with hostbridge/store.py's
settings (journal_mode=WAL, synchronous=FULL, secure_delete=ON, isolation_level=None) and its
transaction (BEGIN IMMEDIATE, INSERT, COMMIT: one fsync of the WAL).

Rounds interleave the two, the side that goes first alternating, so that both sample the same
moments of the machine. Per round: commits/s over the round, p50 and p99 (nearest rank) of one
commit's latency; the summary gives the median of the rounds and the ratio PostgreSQL / SQLite.
Absolute figures on a shared machine mean little; the ratio from the same run is the one to quote.
"""

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support from this tree

import psycopg

from tests.support.postgres import PostgresCluster
from tests.support.tempdirs import short_tempdir

# One row like an outbox entry: a VM, a key, a small value, a time.
SCHEMA_PG = (
    "CREATE TABLE sends (id bigserial PRIMARY KEY, vm text NOT NULL, key text NOT NULL,"
    " value bytea NOT NULL, ts double precision NOT NULL)"
)
SCHEMA_SQLITE = (
    "CREATE TABLE sends (id INTEGER PRIMARY KEY, vm TEXT NOT NULL, key TEXT NOT NULL,"
    " value BLOB NOT NULL, ts REAL NOT NULL)"
)
VALUE = os.urandom(64)


class PgSide:
    name = "postgresql"

    def __init__(self, cluster):
        self.conn = psycopg.connect(cluster.conninfo, autocommit=True)
        self.conn.execute(SCHEMA_PG)
        self.n = 0

    def commit_one(self):
        self.n += 1
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO sends (vm, key, value, ts) VALUES (%s, %s, %s, %s)",
                ("vm-0001", "k%d" % self.n, VALUE, time.time()),
            )

    def close(self):
        self.conn.close()


class SqliteSide:
    name = "sqlite"

    def __init__(self, path):
        # hostbridge/store.py's connection and PRAGMAs.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(SCHEMA_SQLITE)
        self.n = 0

    def commit_one(self):
        self.n += 1
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute(
            "INSERT INTO sends (vm, key, value, ts) VALUES (?, ?, ?, ?)",
            ("vm-0001", "k%d" % self.n, VALUE, time.time()),
        )
        self.db.execute("COMMIT")

    def close(self):
        self.db.close()


def nearest_rank(sorted_values, q):
    return sorted_values[max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.5) - 1))]


def run_round(side, commits):
    latencies = []
    clock = time.perf_counter
    start = clock()
    for _ in range(commits):
        t = clock()
        side.commit_one()
        latencies.append(clock() - t)
    total = clock() - start
    latencies.sort()
    return {
        "commits_per_s": commits / total,
        "p50_us": nearest_rank(latencies, 0.50) * 1e6,
        "p99_us": nearest_rank(latencies, 0.99) * 1e6,
    }


def fdatasync_p50_us(directory, count=500):
    """The floor under both: p50 of an 8 KiB overwrite + fdatasync in a file already allocated
    (as a recycled WAL is), on the same file system. Microseconds mean a write cache under it."""
    path = os.path.join(directory, "fdatasync.probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        block = os.urandom(8192)
        os.pwrite(fd, block * 16, 0)
        os.fsync(fd)
        samples = []
        for i in range(count):
            t = time.perf_counter()
            os.pwrite(fd, block, (i % 16) * 8192)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    samples.sort()
    return nearest_rank(samples, 0.5) * 1e6


def filesystem(path):
    out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()
    fields = out[-1].split() if len(out) > 1 else ["?", "?"]
    return "%s (%s)" % (fields[1], fields[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commits", type=int, default=2000, help="per side and round")
    parser.add_argument("--warmup", type=int, default=200, help="per side, before the rounds")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 300 commits")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite directory")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.commits, args.warmup = 3, 300, 50
    if args.rounds < 1 or args.commits < 100:
        parser.error("at least 1 round of 100 commits (a p99 needs 100 samples)")

    cluster = PostgresCluster()
    sqlite_dir = short_tempdir("ovmd-bench-sqlite-")
    sides = []
    try:
        if os.stat(sqlite_dir).st_dev != os.stat(cluster.data).st_dev:
            print("warning: SQLite and PostgreSQL are on different file systems", file=sys.stderr)
        sides = [PgSide(cluster), SqliteSide(os.path.join(sqlite_dir, "store.db"))]
        pg_version = sides[0].conn.execute("SHOW server_version").fetchone()[0]
        sync_method = (
            sides[0]
            .conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_sync_method'")
            .fetchone()[0]
        )
        print(
            "PostgreSQL %s (fsync on, wal_sync_method %s, psycopg %s, unix socket) vs SQLite %s"
            " (WAL, synchronous=FULL)"
            % (pg_version, sync_method, psycopg.__version__, sqlite3.sqlite_version)
        )
        print(
            "file system: %s; %d rounds x %d commits a side, %d warm-up"
            % (filesystem(cluster.data), args.rounds, args.commits, args.warmup)
        )
        print("bare 8 KiB write + fdatasync there: p50 %.0f us" % fdatasync_p50_us(sqlite_dir))
        for side in sides:
            for _ in range(args.warmup):
                side.commit_one()
        results = {side.name: [] for side in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            line = []
            for side in order:
                figures = run_round(side, args.commits)
                results[side.name].append(figures)
                line.append(
                    "%s %7.0f/s p50 %6.0f us p99 %6.0f us"
                    % (side.name, figures["commits_per_s"], figures["p50_us"], figures["p99_us"])
                )
            print("round %d: %s" % (r + 1, " | ".join(line)))
    finally:
        for side in sides:
            side.close()
        cluster.close()
        if args.keep:
            print("SQLite file kept in %s" % sqlite_dir)
        else:
            shutil.rmtree(sqlite_dir, ignore_errors=True)

    summary = {}
    for name, rounds in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    pg, lite = summary["postgresql"], summary["sqlite"]
    ratios = {k: pg[k] / lite[k] for k in pg}
    print()
    print("median of %d rounds    commits/s   p50 (us)   p99 (us)" % args.rounds)
    for name in ("postgresql", "sqlite"):
        s = summary[name]
        print("%-20s %11.0f %10.0f %10.0f" % (name, s["commits_per_s"], s["p50_us"], s["p99_us"]))
    print(
        "%-20s %10.2fx %9.2fx %9.2fx"
        % ("postgresql/sqlite", ratios["commits_per_s"], ratios["p50_us"], ratios["p99_us"])
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": results, "median": summary, "ratio": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
