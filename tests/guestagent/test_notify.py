"""guestagent.notify: the built-in sd_notify sender over real datagram sockets, and how it reads
systemd's variables."""

import os
import socket

import pytest

from guestagent.notify import Notifier, socket_address, watchdog_interval


def recv(sock):
    sock.settimeout(5)
    return sock.recv(4096).decode("utf-8")


@pytest.fixture
def supervisor(tmp_path):
    """(path, socket): a datagram socket bound at a path, as systemd's $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield path, sock


def test_the_builtin_sender_should_send_datagrams_to_a_path(supervisor):
    path, sock = supervisor
    n = Notifier(environ={"NOTIFY_SOCKET": path}, prefer_systemd=False)
    assert n.enabled
    assert n.ready("waiting for host on /dev/x")
    assert recv(sock) == "READY=1\nSTATUS=waiting for host on /dev/x"
    assert n.status("host connected")
    assert recv(sock) == "STATUS=host connected"
    assert n.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    assert n.stopping()
    assert recv(sock) == "STOPPING=1"
    n.close()


def test_the_builtin_sender_should_reach_an_abstract_socket():
    name = "ovmd-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier(environ={"NOTIFY_SOCKET": "@" + name}, prefer_systemd=False)
        assert n.ready()
        assert recv(sock) == "READY=1"
        n.close()
    finally:
        sock.close()


def test_an_unchanged_status_should_not_be_sent_again(supervisor):
    path, sock = supervisor
    n = Notifier(environ={"NOTIFY_SOCKET": path}, prefer_systemd=False)
    n.status("host connected")
    n.status("host connected")
    n.status("waiting")
    assert recv(sock) == "STATUS=host connected"
    assert recv(sock) == "STATUS=waiting"


def test_it_should_do_nothing_without_notify_socket():
    n = Notifier(environ={})
    assert not n.enabled
    assert not n.ready()


def test_a_vanished_supervisor_should_not_raise(tmp_path):
    n = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}, prefer_systemd=False)
    assert n.ready() is False


def test_socket_address_should_map_at_to_the_abstract_namespace():
    assert socket_address("@x/y") == "\0x/y"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("") is None
    assert socket_address("vsock:2:1") is None


def test_watchdog_interval_should_be_half_of_watchdog_usec_for_our_pid():
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "5"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "6"}, pid=5) is None
    assert watchdog_interval({}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, pid=5) is None
