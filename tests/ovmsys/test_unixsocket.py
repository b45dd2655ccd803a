"""ovmsys.unixsocket: a listening socket that replaces a stale file, refuses a live one, is never
open to others, and removes only its own file."""

import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from ovmsys import unixsocket


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "s.sock")


def connect(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def test_it_should_accept_connections_without_blocking(path):
    listener = unixsocket.listen(path)
    try:
        with pytest.raises(BlockingIOError):
            listener.sock.accept()  # nobody yet: an event loop's socket never blocks
        with connect(path):
            conn, _ = listener.sock.accept()
            conn.close()
    finally:
        listener.close()


def test_a_stale_socket_file_should_be_replaced(path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays and nobody listens: what a kill -9 leaves behind
    with pytest.raises(ConnectionRefusedError):
        connect(path)
    listener = unixsocket.listen(path)
    try:
        connect(path).close()
    finally:
        listener.close()


def test_a_live_socket_should_be_refused_and_left_alone(path):
    first = unixsocket.listen(path)
    try:
        with pytest.raises(unixsocket.SocketInUse):
            unixsocket.listen(path)
        with connect(path):  # the first one still serves, at the same file
            conn, _ = first.sock.accept()
            conn.close()
    finally:
        first.close()


def test_a_path_that_is_not_a_socket_should_be_refused_and_kept(path):
    with open(path, "w") as f:
        f.write("someone's file")
    with pytest.raises(unixsocket.NotASocket):
        unixsocket.listen(path)
    with open(path) as f:
        assert f.read() == "someone's file"


def test_the_socket_should_be_private_whatever_the_umask(path):
    old = os.umask(0)
    try:
        listener = unixsocket.listen(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        listener.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the socket another group")
def test_it_should_give_the_socket_its_group_and_mode(path):
    gid = grp.getgrnam("nogroup").gr_gid
    listener = unixsocket.listen(path, mode=0o660, gid=gid)
    try:
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    finally:
        listener.close()


def test_it_should_create_the_missing_directory_0755(tmp_path):
    path = str(tmp_path / "run" / "daemon" / "s.sock")
    old = os.umask(0o077)
    try:
        listener = unixsocket.listen(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
    finally:
        listener.close()


def test_close_should_remove_the_socket_file(path):
    unixsocket.listen(path).close()
    assert not os.path.exists(path)


def test_close_should_not_remove_a_newer_listeners_file(path):
    old = unixsocket.listen(path)
    os.unlink(path)  # e.g. an operator cleaned up, and a new daemon started
    new = unixsocket.listen(path)
    try:
        old.close()
        connect(path).close()  # the new one's file is still there and serves
    finally:
        new.close()
    assert not os.path.exists(path)


@pytest.fixture
def shared_dir():
    """A directory any user may create sockets in (pytest's own tmp_path is root's alone)."""
    d = tempfile.mkdtemp(prefix="ovmsys-test-", dir="/tmp")
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_a_failure_after_bind_should_leave_no_socket_file(shared_dir):
    # As nobody, giving the socket root's group fails (EPERM), after the bind.
    path = os.path.join(shared_dir, "s.sock")
    code = (
        "import os, sys\n"
        "from ovmsys import unixsocket\n"  # before dropping root: the interpreter may be root's
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "unixsocket.listen(%r).close()\n"  # nobody may bind there: the failure is the chown
        "try:\n    unixsocket.listen(%r, mode=0o660, gid=0)\n"
        "except PermissionError:\n    sys.exit(0)\n"
        "sys.exit(1)\n" % (path, path)
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.listdir(shared_dir) == []
