"""The daemon's files against another local user: it never writes through a symlink planted at a
name it uses, and it refuses to start in a directory someone other than root could change
(issue 8, item 7). The real daemon, real directories and symlinks."""

import os

import pytest

from tests.guestagent.harness import Daemon, Host
from tests.support.tempdirs import short_dir

NOBODY = 65534


def test_a_symlink_at_the_old_temp_name_should_not_make_the_daemon_write_through_it():
    with Host() as host, Daemon(channel=host.link) as daemon, short_dir() as elsewhere:
        daemon.wait_ready()
        victim = elsewhere / "shadow"
        victim.write_bytes(b"root:precious\n")
        # The name the cache's temp file had before: cache.json.tmp-PID, known to anyone.
        planted = os.path.join(daemon.state_dir, "cache.json.tmp-%d" % daemon.pid)
        os.symlink(victim, planted)
        assert daemon.ovmd("-p", "db.password=hunter2").returncode == 0
        assert daemon.ovmd("-p", "db.password=hunter3").returncode == 0
        assert victim.read_bytes() == b"root:precious\n"
        assert os.readlink(planted) == str(victim)
        cache = os.path.join(daemon.state_dir, "cache.json")
        assert not os.path.islink(cache)
        assert b"hunter3" in daemon.cache_file_bytes()
        assert daemon.ovmd("-g", "db.password").stdout == "hunter3\n"


def _give_away(path, mode):
    if mode is None:
        os.chown(path, NOBODY, NOBODY)
    else:
        os.chmod(path, mode)


@pytest.mark.parametrize("which", ["state", "socket"])
@pytest.mark.parametrize(
    "mode, problem",
    [
        (0o777, "is writable by others (mode 0777)"),
        (0o775, "is writable by its group (mode 0775)"),
        (None, "is owned by uid %d, not by root" % NOBODY),
    ],
)
def test_it_should_refuse_to_start_in_a_directory_someone_else_can_change(which, mode, problem):
    if mode is None and os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    with Host() as host:
        daemon = Daemon(channel=host.link)
        shared = os.path.join(daemon.dir, "shared")
        os.mkdir(shared, 0o700)
        _give_away(shared, mode)
        if which == "state":
            daemon.state_dir = shared
        else:
            daemon.socket = os.path.join(shared, "ovmd.sock")
        with daemon:
            assert daemon.proc.wait(15) == 1
            lines = [line for line in daemon.log().splitlines() if "cannot start" in line]
            assert len(lines) == 1 and lines[0].endswith(
                "cannot start: %s directory %s %s; only root may be able to change it"
                % (which, shared, problem)
            ), daemon.log()
            assert os.listdir(shared) == []  # nothing written, nothing bound
