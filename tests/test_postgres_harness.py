"""The tests' PostgreSQL cluster (tests/support/postgres.py): private, durable, restartable, and
gone without a trace once closed. The pool of host bridges will stand on it."""

from __future__ import annotations

import os
import subprocess
import uuid

import psycopg
import pytest

from tests.support.postgres import PostgresCluster
from tests.support.waiting import wait_for


def _table(conn: psycopg.Connection) -> str:
    """A fresh table in the shared database (tests share the session's cluster)."""
    name = "t_%s" % uuid.uuid4().hex[:12]
    with conn.transaction():
        conn.execute("CREATE TABLE %s (id integer PRIMARY KEY, value text NOT NULL)" % name)
    return name


class ReconnectingClient:
    """What the pool's bridges will do: on a broken connection, connect again (with a deadline)
    and retry the statement."""

    def __init__(self, conninfo: str):
        self.conninfo = conninfo
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.reconnects = 0

    def fetchall(self, query: str) -> list[tuple]:
        try:
            return self.conn.execute(query).fetchall()
        except psycopg.OperationalError:
            self.conn.close()
            self.conn = wait_for(self._connect, what="a new connection")
            self.reconnects += 1
            return self.conn.execute(query).fetchall()

    def _connect(self) -> psycopg.Connection | None:
        try:
            return psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2)
        except psycopg.OperationalError:
            return None

    def close(self) -> None:
        self.conn.close()


def test_the_cluster_should_serve_the_test_role_on_its_own_unix_socket_only(postgres_server):
    pg = postgres_server
    with psycopg.connect(pg.conninfo) as conn:
        row = conn.execute("SELECT current_user, current_database(), inet_server_addr()").fetchone()
    # inet_server_addr() is NULL on a unix socket connection.
    assert row == ("ovmd", "ovmd", None)
    with psycopg.connect(pg.admin_conninfo) as admin:  # the test role may not read these
        settings = admin.execute(
            "SELECT current_setting('listen_addresses'),"
            " current_setting('unix_socket_directories'),"
            " current_setting('fsync'), current_setting('synchronous_commit')"
        ).fetchone()
    assert settings == ("", pg.dir, "on", "on")
    assert os.path.dirname(pg.socket_path) == pg.dir


def test_a_committed_row_should_be_seen_by_another_connection(postgres_server):
    pg = postgres_server
    with psycopg.connect(pg.conninfo) as writer, psycopg.connect(pg.conninfo) as reader:
        table = _table(writer)
        with writer.transaction():
            writer.execute("INSERT INTO %s VALUES (1, 'one')" % table)
            # Not yet committed: the other session must not see it.
            assert reader.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)
            reader.rollback()
        assert reader.execute("SELECT value FROM %s" % table).fetchall() == [("one",)]


def test_a_notification_should_reach_the_listening_connection(postgres_server):
    pg = postgres_server
    received: list[psycopg.Notify] = []
    listener = psycopg.connect(pg.conninfo, autocommit=True)
    notifier = psycopg.connect(pg.conninfo, autocommit=True)
    with listener, notifier:
        listener.add_notify_handler(received.append)
        listener.execute("LISTEN outbox")
        notifier.execute("SELECT pg_notify('outbox', 'vm1')")

        def delivered() -> bool:
            listener.execute("SELECT 1")  # notifications are read with any result
            return bool(received)

        wait_for(delivered, what="the notification")
        assert [(n.channel, n.payload) for n in received] == [("outbox", "vm1")]
        assert received[0].pid == notifier.info.backend_pid


def test_a_reconnecting_client_should_survive_a_restart_and_see_what_was_committed(
    postgres_server,
):
    pg = postgres_server
    with psycopg.connect(pg.conninfo) as conn:
        table = _table(conn)
        with conn.transaction():
            conn.execute("INSERT INTO %s VALUES (1, 'before the restart')" % table)
    client = ReconnectingClient(pg.conninfo)
    try:
        assert client.fetchall("SELECT value FROM %s" % table) == [("before the restart",)]
        pg.restart()
        assert client.fetchall("SELECT value FROM %s" % table) == [("before the restart",)]
        assert client.reconnects == 1
    finally:
        client.close()


def test_a_committed_row_should_survive_a_kill_of_the_server(postgres_server):
    pg = postgres_server
    conn = psycopg.connect(pg.conninfo, autocommit=True)
    try:
        table = _table(conn)
        conn.execute("INSERT INTO %s VALUES (1, 'committed')" % table)
        pg.kill()
        assert not pg.processes()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    pg.start()  # crash recovery replays the WAL
    with psycopg.connect(pg.conninfo) as conn:
        assert conn.execute("SELECT value FROM %s" % table).fetchall() == [("committed",)]


def _shared_memory_of(pids: list[int]) -> set[str]:
    """The System V shared memory segments that one of ``pids`` created. By creator, not by a
    before/after difference: other clusters (tests running beside this one) come and go."""
    out = subprocess.run(["ipcs", "-m", "-p"], capture_output=True, text=True, check=True).stdout
    mine = {str(pid) for pid in pids}
    return {
        f[0] for f in (line.split() for line in out.splitlines()) if len(f) >= 3 and f[2] in mine
    }


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: where pid 1 reaps no orphans, as on some VMs,
    the backends of a killed server stay zombies, which hold no memory, file or socket)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["running", "killed", "stopped"])
def test_closing_should_leave_no_process_no_directory_and_no_shared_memory(how):
    pg = PostgresCluster()
    with pg:
        conn = psycopg.connect(pg.conninfo)  # a backend too, left open on purpose
        pids = pg.processes()
        assert pg.proc.pid in pids and len(pids) > 1
        assert _shared_memory_of(pids) != set()  # the server's segment: what must go below
        if how == "killed":
            pg.kill()
        elif how == "stopped":
            pg.stop()
    conn.close()
    assert not os.path.exists(pg.dir)
    # The data directory is gone, so pg.processes() could not see survivors: ask by pid (a reused
    # pid would be a false alarm, not a missed leftover).
    assert [pid for pid in pids if _alive(pid)] == []
    assert _shared_memory_of(pids) == set()


def test_a_new_database_should_belong_to_the_test_role(postgres_server):
    pg = postgres_server
    name = "d_%s" % uuid.uuid4().hex[:12]
    with psycopg.connect(pg.create_database(name)) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == (
            name,
            "ovmd",
        )
        table = _table(conn)
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)


SYSTEM_PATHS = ("/var/run/postgresql", "/run/postgresql", "/var/lib/postgresql")


def _system_state() -> dict[str, object]:
    """What a start or stop of the machine's own PostgreSQL would change: its socket directory's
    entries and its clusters' postmaster.pid files."""
    state: dict[str, object] = {}
    for top in SYSTEM_PATHS:
        if os.path.isdir(top):
            for dirpath, _, filenames in os.walk(top):
                for name in filenames:
                    if name.startswith(".s.PGSQL") or name == "postmaster.pid":
                        path = os.path.join(dirpath, name)
                        state[path] = os.lstat(path).st_mtime_ns
    return state


def test_restarting_the_tests_cluster_should_leave_the_machines_postgresql_alone(
    postgres_server,
):
    before = _system_state()
    postgres_server.restart()
    postgres_server.kill()
    postgres_server.start()
    assert _system_state() == before
    assert not postgres_server.dir.startswith(SYSTEM_PATHS)
    assert not os.path.realpath(postgres_server.data).startswith(SYSTEM_PATHS)
