"""A real PostgreSQL cluster of the tests' own, in a temporary directory, from Debian's binaries
(scripts/packages-test.txt installs ``postgresql``; /usr/lib/postgresql/VERSION/bin).

    with PostgresCluster() as pg:            # initdb, start, a role and a database
        psycopg.connect(pg.conninfo)         # over the unix socket in pg.dir
        pg.restart()                         # a clean stop (fast shutdown), then start again
        pg.kill()                            # SIGKILL, as a crash; start() runs crash recovery

The suite shares one cluster, started once a session (initdb and the first start cost ~1 s):
the ``postgres_server`` fixture in tests/conftest.py gives it running, started again if an earlier
test stopped or killed it.

Never the machine's own cluster: no TCP (listen_addresses is empty), the only socket lives in the
cluster's directory (never /var/run/postgresql), on a port other than the default, so that a
conninfo that lost its host fails instead of reaching a system server; nothing here calls
pg_ctlcluster or systemctl. fsync and synchronous_commit are on, as in production: the tests and
bench/pg_commit.py measure durable commits.

As root (the suite's case), initdb and the server run as the ``postgres`` user (both refuse root),
and the directory belongs to that user; as anyone else, they run as that user. Local connections
are trusted: only root and the cluster's owner can reach the socket (the directory is 0700).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess

from tests.support.closing import Closing
from tests.support.processes import child_env
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import TIMEOUT, wait_for

BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Not 5432: a client that lost its host= would reach a system server on the default socket.
PORT = 55432
SUPERUSER = "postgres"
ROLE = "ovmd"
DATABASE = "ovmd"


class PostgresUnavailable(RuntimeError):
    """Debian's PostgreSQL server is not installed (scripts/bootstrap.sh --test installs it)."""


def bin_dir() -> str:
    """The newest installed server's bin directory (Debian keeps each major version apart)."""
    found = [d for d in glob.glob(BIN_GLOB) if os.path.exists(os.path.join(d, "postgres"))]
    if not found:
        raise PostgresUnavailable(
            "no PostgreSQL server in %s: run scripts/bootstrap.sh --test" % BIN_GLOB
        )
    return max(found, key=lambda d: int(re.sub(r"\D", "", d.split("/")[-2]) or 0))


def _owner() -> tuple[int, int] | None:
    """(uid, gid) the server runs as: the postgres user when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("no postgres user: install Debian's postgresql") from None
    return pw.pw_uid, pw.pw_gid


def _cwd_is(pid: str, directory: str) -> bool:
    try:
        return os.readlink("/proc/%s/cwd" % pid) == directory
    except OSError:
        return False  # gone, or not ours to read


class PostgresCluster(Closing):
    """One cluster: ``dir`` (its socket, log and ``data/``), started by the constructor with a
    role ``ovmd`` owning a database ``ovmd``; close() stops it and removes the directory, whatever
    state it is in (killed, stopped, half started)."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.bin = bin_dir()
        self.owner = _owner()
        self.dir = short_tempdir("ovmd-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "server.log")
        self.port = PORT
        self.proc: subprocess.Popen | None = None
        try:
            if self.owner is not None:
                # The server must reach its directory; mkdtemp made it 0700 for root.
                os.chown(self.dir, *self.owner)
            self._initdb()
            self.start()
            self.psql(
                "CREATE ROLE %s LOGIN" % ROLE,
                "CREATE DATABASE %s OWNER %s" % (DATABASE, ROLE),
            )
        except BaseException:
            self.close()
            raise

    # -- connecting --------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, ".s.PGSQL.%d" % self.port)

    def conninfo_for(self, dbname: str = DATABASE, user: str = ROLE) -> str:
        """A libpq conninfo (psycopg.connect's first argument) over the unix socket."""
        return "host=%s port=%d dbname=%s user=%s" % (self.dir, self.port, dbname, user)

    @property
    def conninfo(self) -> str:
        """The test role on the test database."""
        return self.conninfo_for()

    @property
    def admin_conninfo(self) -> str:
        """The superuser on the ``postgres`` database (to create databases, end sessions...)."""
        return self.conninfo_for("postgres", SUPERUSER)

    def psql(self, *statements: str, dbname: str = "postgres") -> str:
        """Run each statement as the superuser (its own transaction); psql's output. Raises
        AssertionError with psql's message when one fails."""
        command = [os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        command += ["-h", self.dir, "-p", str(self.port), "-U", SUPERUSER, "-d", dbname]
        for s in statements:
            command += ["-c", s]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=self.timeout, env=self._env()
        )
        if result.returncode != 0:
            raise AssertionError("psql failed (%d): %s" % (result.returncode, result.stderr))
        return result.stdout

    def create_database(self, name: str) -> str:
        """A new empty database owned by the test role; its conninfo (for a test that needs a
        database of its own in the shared cluster)."""
        self.psql('CREATE DATABASE "%s" OWNER %s' % (name, ROLE))
        return self.conninfo_for(name)

    # -- the server --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # PG* variables (PGHOST, PGOPTIONS, PGSERVICE...) would redirect or reconfigure psql and
        # the server behind the explicit options; LC_ALL: initdb's and the messages' locale,
        # whatever the machine's is (C exists everywhere).
        return child_env({"LC_ALL": "C"}, drop_prefixes=("PG",))

    def _popen_owner(self) -> dict[str, object]:
        if self.owner is None:
            return {}
        return {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}

    def _initdb(self) -> None:
        # --no-sync: initdb's own final flush of the fresh files; a throwaway cluster needs none
        # (a kill -9 of the server keeps the page cache). The server itself runs with fsync on.
        command = [os.path.join(self.bin, "initdb"), "-D", self.data, "-U", SUPERUSER]
        command += ["--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=max(self.timeout, 60),
            env=self._env(),
            cwd=self.dir,
            **self._popen_owner(),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise AssertionError("initdb failed (%d):\n%s" % (result.returncode, result.stderr))

    def command(self) -> list[str]:
        """The server's command line: every setting that keeps it private and durable given
        here, so that nothing in postgresql.conf or the machine can change them."""
        settings = {
            "listen_addresses": "",  # no TCP at all
            "unix_socket_directories": self.dir,
            "port": str(self.port),
            # Explicit: the bench and the pool measure and rely on durable commits.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            # Dynamic shared memory as files in data/ (not /dev/shm): they go with the directory
            # even when the server was killed and never restarted.
            "dynamic_shared_memory_type": "mmap",
            "logging_collector": "off",  # the log goes to stderr: our file
            "log_min_messages": "warning",
        }
        command = [os.path.join(self.bin, "postgres"), "-D", self.data]
        for name, value in settings.items():
            command += ["-c", "%s=%s" % (name, value)]
        return command

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> PostgresCluster:
        """Start the server (after a kill, with crash recovery) and wait until it accepts
        connections."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env(),
                cwd=self.dir,
                close_fds=True,
                # Its own session: a ^C in the test's terminal reaches pytest, which then stops
                # the server cleanly, not the server behind its back.
                start_new_session=True,
                **self._popen_owner(),  # type: ignore[arg-type]
            )
        wait_for(self._ready, self.timeout, what="PostgreSQL to accept connections")
        return self

    def _ready(self) -> bool:
        if not self.running:
            raise AssertionError(
                "PostgreSQL exited with %s:\n%s" % (self.proc.returncode, self.log())
            )
        # postmaster.pid's 8th line is "ready" once the server accepts connections (what pg_ctl
        # waits for); its first line tells that it is this server's and not a killed one's.
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                lines = f.read().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.proc.pid) and lines[7].strip() == "ready"

    def stop(self) -> None:
        """A clean stop: fast shutdown (SIGINT: open sessions are ended, not waited for), then
        wait; immediate shutdown, then SIGKILL, if it takes longer than the deadline."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                "PostgreSQL ignored a fast shutdown for %.1fs:\n%s" % (self.timeout, self.log())
            ) from None
        self._wait_processes_gone()

    def restart(self) -> PostgresCluster:
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server and every process of it at once, as a crash of the database's
        machine would; start() then runs crash recovery. A killed postmaster's backends would
        otherwise linger until they notice, and keep its shared memory in use."""
        if self.proc is not None and self.running:
            # Stopped first: it can fork no new backend between our look and our kill.
            self.proc.send_signal(signal.SIGSTOP)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self._wait_processes_gone()

    def processes(self) -> list[int]:
        """The pids of this cluster's processes (every one of them runs in data/), its postmaster
        included, even those a killed postmaster left behind."""
        data = os.path.realpath(self.data)
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _cwd_is(p, data)]

    def _wait_processes_gone(self) -> None:
        wait_for(lambda: not self.processes(), self.timeout, what="PostgreSQL's processes to exit")

    def backend_pids(self, dbname: str = DATABASE) -> list[int]:
        """The server pids of the client sessions on ``dbname``."""
        out = self.psql("SELECT pid FROM pg_stat_activity WHERE datname = '%s'" % dbname)
        return [int(line) for line in out.split()]

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _remove_leftover_shared_memory(self) -> None:
        # A server that did not stop cleanly leaves its (small) System V segment behind, named in
        # postmaster.pid's 7th line ("KEY ID"); a restart would remove it, removing the directory
        # does not.
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                lines = f.read().splitlines()
            shmid = int(lines[6].split()[1])
        except (OSError, IndexError, ValueError):
            return
        subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True)

    def close(self) -> None:
        try:
            try:
                self.stop()
            except AssertionError:
                pass  # it was killed on the way: removing it is all that is left
            if self.processes():
                self.kill()
            self._remove_leftover_shared_memory()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self


class StandbyCluster(PostgresCluster):
    """A streaming replica of ``primary`` (pg_basebackup -R over its socket), on the next port and
    a directory of its own: promote() makes it the primary, as a failover does.

        with PostgresCluster() as pg, StandbyCluster(pg) as standby:
            pg.kill(); standby.promote()
    """

    def __init__(self, primary: PostgresCluster, timeout: float = TIMEOUT) -> None:
        self.primary = primary
        self.timeout = timeout
        self.bin = primary.bin
        self.owner = primary.owner
        self.dir = short_tempdir("ovmd-pg-standby-")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "server.log")
        self.port = primary.port + 1
        self.proc = None
        try:
            if self.owner is not None:
                os.chown(self.dir, *self.owner)
            self._base_backup()
            self.start()
        except BaseException:
            self.close()
            raise

    def _base_backup(self) -> None:
        # -R: standby.signal and the primary's conninfo, so that it starts as a replica;
        # --checkpoint=fast: do not wait for the primary's next checkpoint.
        command = [os.path.join(self.bin, "pg_basebackup"), "-D", self.data, "-R", "-X", "stream"]
        command += ["-h", self.primary.dir, "-p", str(self.primary.port), "-U", SUPERUSER]
        command += ["--checkpoint=fast", "--no-sync"]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=max(self.timeout, 60),
            env=self._env(),
            cwd=self.dir,
            **self._popen_owner(),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise AssertionError(
                "pg_basebackup failed (%d): %s" % (result.returncode, result.stderr)
            )

    def promote(self) -> None:
        """End recovery: the replica becomes a primary that accepts writes."""
        self.psql("SELECT pg_promote(true, %d)" % int(self.timeout))

    def caught_up(self) -> bool:
        """Whether the replica has replayed everything the primary has written so far."""
        want = self.primary.psql("SELECT pg_current_wal_lsn()").strip()
        done = self.psql("SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % want).strip()
        return done == "t"


def wait_until_accepting(conninfo: str, timeout: float = TIMEOUT) -> None:
    """Wait until a new psycopg connection to ``conninfo`` succeeds (after a restart)."""
    import psycopg  # only the tests that use the database need the driver

    def connects() -> bool:
        try:
            psycopg.connect(conninfo, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    wait_for(connects, timeout, what="a connection to %s" % conninfo)
