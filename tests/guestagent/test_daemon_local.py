"""The real daemon's local socket, with real clients (and the host on a real pty)."""

import grp
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from ovmproto.codec import encode
from ovmproto.messages import (
    Clear,
    Delete,
    Err,
    Events,
    Get,
    List,
    Ok,
    Ping,
    PostEvent,
    Put,
    Set,
    Wait,
)
from tests.guestagent.harness import Daemon, Host
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def guest():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello(epoch="local-tests")
        yield daemon, host


@pytest.fixture
def client(guest):
    with guest[0].client() as c:
        yield c


def test_a_local_set_while_synced_should_be_announced_to_the_host(guest, client):
    _daemon, host = guest
    before = len(host.changed)
    assert type(client.request(Set, key="from.guest", value="hello")) is Ok
    ch = host.wait_changed(before + 1)[before]
    assert (ch.op, ch.key, ch.value, ch.origin) == ("set", "from.guest", "hello", "guest")
    got = host.request(Get, key="from.guest")
    assert (got.value, got.origin) == ("hello", "guest")


def test_local_requests_should_follow_the_protocol(guest, client):
    _daemon, host = guest
    before = len(host.changed)
    assert type(client.request(Ping)) is Ok
    assert type(client.request(Put, items=[["p1", "1"], ["p2", "2"]])) is Ok
    # All or none: one bad pair refuses the whole put.
    bad = client.request(Put, items=[["p3", "3"], ["bad=key", "x"]])
    assert (type(bad), bad.code) == (Err, "invalid_key")
    assert client.request(Get, key="p3").code == "not_found"
    assert client.request(Delete, key="p1").found is True
    assert client.request(Delete, key="p1").found is False
    assert client.request(Set, key="k", value="v", seq=5).code == "bad_request"
    assert type(client.request(PostEvent, value="local-event")) is Ok
    items, done = client.listing(Events)
    assert items[-1].value == "local-event"
    assert type(client.request(Clear)) is Ok
    items, done = client.listing(List)
    assert (items, done.count) == ([], 0)
    # put (2 keys), the first del and the clear changed the cache; nothing else did.
    changed = host.wait_changed(before + 4)[before:]
    assert [(c.op, c.key) for c in changed] == [
        ("set", "p1"),
        ("set", "p2"),
        ("del", "p1"),
        ("clear", None),
    ]


def test_wait_should_be_woken_by_the_change_itself(guest, client):
    daemon, host = guest
    waiter_id = client.next_id()
    client.send(Wait(id=waiter_id, key="wake.me", timeout=30))
    assert type(client.request(Ping)) is Ok  # the wait is registered, not answered
    assert not any(getattr(m, "id", None) == waiter_id for m in client.pending)
    host.request(Set, key="wake.me", value="now", seq=100)
    woken = client.reply(waiter_id, timeout=5)
    assert (woken.key, woken.value, woken.origin) == ("wake.me", "now", "host")
    # Without `changed`, an existing key answers at once; with it, only the next set does.
    assert client.request(Wait, key="wake.me", timeout=5).value == "now"
    changed_id = client.next_id()
    client.send(Wait(id=changed_id, key="wake.me", changed=True, timeout=30))
    with daemon.client() as other:
        other.request(Set, key="wake.me", value="again")
    assert client.reply(changed_id, timeout=5).value == "again"


def test_wait_should_time_out_with_err_timeout(client):
    reply = client.request(Wait, key="never.set", timeout=0.2)
    assert (type(reply), reply.code) == (Err, "timeout")


def test_a_client_that_never_reads_should_not_stop_the_host_link(guest, client):
    daemon, host = guest
    big = "v" * 8000
    assert type(client.request(Put, items=[["big%d" % i, big] for i in range(8)])) is Ok
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.connect(daemon.socket)
    greedy.setblocking(False)
    try:
        # 400 listings of ~64 KB each, never read: far more than the socket and outbox hold.
        requests = b"".join(encode(List(id=i)) for i in range(400))
        sent = 0
        deadline = time.monotonic() + 10
        while sent < len(requests) and time.monotonic() < deadline:
            try:
                sent += greedy.send(requests[sent:])
            except BlockingIOError:
                break  # the daemon stopped reading us, or dropped us
            except OSError:
                break
            assert type(host.request(Ping, reply_timeout=5)) is Ok
        for _ in range(20):
            assert type(host.request(Ping, reply_timeout=5)) is Ok
        wait_for(lambda: "does not read its replies" in daemon.log(), what="disconnect")
        # The greedy client was dropped: after what was buffered, its socket ends.
        greedy.setblocking(True)
        greedy.settimeout(10)
        while True:
            try:
                if not greedy.recv(1 << 20):
                    break
            except ConnectionResetError:
                break
    finally:
        greedy.close()
    assert type(client.request(Ping)) is Ok
    client.request(Clear)


def test_a_half_closed_client_should_get_its_answers_then_be_closed(guest):
    daemon, _host = guest
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(daemon.socket)
    try:
        s.sendall(
            encode(Set(id=1, key="half", value="closed"))
            + encode(List(id=2))
            + encode(Wait(id=3, key="never.there", timeout=0.3))
        )
        s.shutdown(socket.SHUT_WR)  # like `socat` once its input ends
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # the daemon closed it once everything was answered
            data += chunk
    finally:
        s.close()
    lines = data.decode().splitlines()
    assert lines[0] == '{"t":"ok","id":1}'
    assert any('"key":"half"' in line and '"t":"item"' in line for line in lines)
    assert '"code":"timeout"' in lines[-1] and '"id":3' in lines[-1]


def test_a_large_listing_should_stream_to_a_client_that_reads(guest, client):
    assert type(client.request(Clear)) is Ok
    value = "x" * 8192
    items = [["list%03d" % i, value] for i in range(200)]  # ~1.7 MB: far above the outbox limit
    for start in range(0, 200, 5):  # a frame holds at most 64 KiB
        assert type(client.request(Put, items=items[start : start + 5])) is Ok
    got, done = client.listing(List, reply_timeout=20)
    assert done.count == 200
    assert [i.key for i in got] == [k for k, _ in items]
    assert all(i.value == value for i in got)
    client.request(Clear)


def test_the_socket_should_be_private_and_its_directory_created():
    with Host() as host:
        daemon = Daemon(channel=host.link)
        daemon.socket = os.path.join(daemon.dir, "sub", "dir", "ovmd.sock")
        with daemon:
            daemon.wait_ready()
            assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode) == 0o755
            assert daemon.stop() == 0
            assert not os.path.exists(daemon.socket)


def test_a_stale_socket_file_should_be_replaced_and_a_live_one_refused():
    with Host() as host, Daemon(channel=host.link) as first:
        first.wait_ready()
        second = Daemon(channel=host.link, socket_path=first.socket)
        with second:
            assert second.proc.wait(10) == 1
            assert "another daemon is listening" in second.log()
        first.kill()  # leaves its socket file behind
        assert os.path.exists(first.socket)
        first.start().wait_ready()
        with first.client() as c:
            assert type(c.request(Ping)) is Ok


def _connect_as(path, uid, gid, groups=()):
    """Connect from a real process running as uid/gid; return what the daemon answered."""
    code = (
        "import os, socket, sys\n"
        "os.setgroups(%r); os.setgid(%d); os.setuid(%d)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(%r)\n"
        'try:\n    s.sendall(b\'{"t":"ping","id":1}\\n\')\n'
        "except OSError:\n    pass  # refused clients are closed at once\n"
        "sys.stdout.write(s.recv(4096).decode())\n" % (list(groups), gid, uid, path)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as other users")
def test_only_root_the_daemon_uid_or_the_group_should_be_allowed():
    group = grp.getgrnam("nogroup")
    with Host() as host:
        daemon = Daemon(channel=host.link, args=["--group", "nogroup"])
        with daemon:
            daemon.wait_ready()
            os.chmod(daemon.dir, 0o755)
            st = os.stat(daemon.socket)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)
            # Let anyone reach the socket, so that the daemon's own check is what decides.
            os.chmod(daemon.socket, 0o666)
            refused = _connect_as(daemon.socket, 65534, 65533)
            assert '"code":"denied"' in refused
            assert '"t":"ok"' in _connect_as(daemon.socket, 65534, group.gr_gid)
            assert '"t":"ok"' in _connect_as(daemon.socket, 65534, 65533, [group.gr_gid])


def test_an_over_long_frame_should_be_answered_with_an_error_not_silence(client):
    client.send(b'{"t":"put","id":7,"items":[["k","' + b"v" * 70000 + b'"]]}\n')
    reply = client.take(lambda m: type(m) is Err, timeout=10, what="an err")
    assert (reply.code, reply.id) == ("frame_too_long", None)
    assert type(client.request(Ping)) is Ok  # the connection still serves
