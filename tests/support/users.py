"""Acting as another local user (tests run as root): connections whose SO_PEERCRED is that user's,
and a function run in a child that has become that user.

Forked children, not new interpreters: this machine's Python lives under /root, which an
unprivileged user may not enter. A connection keeps the credentials of the process that called
connect(), so a child connects as the user and hands the sockets to the test (SCM_RIGHTS): the
test then holds, reads and closes connections that the daemon sees as the other user's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from tests.support.waiting import TIMEOUT


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def run_as(uid: int, gid: int, func: Callable[[], int]) -> tuple[int, bytes, bytes]:
    """Run ``func()`` in a forked child as ``uid``/``gid`` (no supplementary groups), its stdout
    and stderr captured; return (exit status, stdout, stderr). ``func`` returns the status."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            _become(uid, gid)
            code = func()
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks = {out_r: b"", err_r: b""}
    for fd in (out_r, err_r):
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks[fd] += data
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), chunks[out_r], chunks[err_r]


def connections_as(
    uid: int, gid: int, path: str, count: int, payload: bytes = b""
) -> list[socket.socket]:
    """``count`` connections to the unix socket ``path`` made by ``uid``/``gid``, each having sent
    ``payload`` (a refused one may have been closed before it could); the test owns them."""
    assert 0 < count <= 200  # one SCM_RIGHTS message carries at most 253 descriptors
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 99
        try:
            parent.close()
            _become(uid, gid)
            held = []
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(TIMEOUT)
                s.connect(path)
                try:
                    s.sendall(payload)
                except OSError:
                    pass  # refused and closed already: the test reads why
                held.append(s)
            socket.send_fds(child, [b"%d" % len(held)], [s.fileno() for s in held])
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        parent.settimeout(TIMEOUT)
        msg, fds, _, _ = socket.recv_fds(parent, 16, count)
    finally:
        parent.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and msg == b"%d" % count, (status, msg)
    return [socket.socket(fileno=fd) for fd in fds]


def read_to_end(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything ``sock`` receives until the peer closes it (HarnessTimeout-like
    AssertionError when it stays open past ``timeout``)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(
                "the connection stayed open for %.1fs (got %r)" % (timeout, data)
            ) from None
        if not chunk:
            return data
        data += chunk
