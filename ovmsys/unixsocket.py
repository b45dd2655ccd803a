"""A listening unix stream socket, as a daemon needs it.

listen() makes the parent directory when missing, replaces a stale socket file (one nobody answers
on: what a kill -9 leaves behind) but refuses a live one or a path that is not a socket, binds
under a restrictive umask so the socket is never open to others, then gives it its group and
mode. UnixListener.close() removes the socket file only if it is still ours: a newer daemon may
have replaced it meanwhile.

The socket is non-blocking and close-on-exec, ready for an event loop (an asyncio server takes it
with ``sock=``). Every failure is an OSError; SocketInUse and NotASocket say which refusal it was.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

PROBE_TIMEOUT = 1.0


class SocketInUse(OSError):
    """Another process listens on the path."""


class NotASocket(OSError):
    """The path exists and is not a socket: not ours to remove."""


def remove_stale(path: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Unlink the socket file at ``path`` when nobody answers on it; raise SocketInUse when
    someone does, NotASocket when it is something else. Nothing there is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise NotASocket(errno.EEXIST, "it exists and is not a socket (not removing it)", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left over from a process that died
        return
    except FileNotFoundError:
        return  # removed meanwhile
    except (socket.timeout, BlockingIOError):
        pass  # a listener whose backlog is full: busy, not gone
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, "another process is listening on it", path)


class UnixListener:
    """A bound, listening socket (``sock``) at ``path``; see listen()."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._ino = os.stat(path).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and remove its file, unless another process has replaced it."""
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass


def listen(path: str, mode: int = 0o600, gid: int | None = None, backlog: int = 64) -> UnixListener:
    """Listen on ``path`` with file mode ``mode``, group-owned by ``gid`` when given; OSError."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, 0o755)
        os.chmod(parent, 0o755)  # makedirs' mode passes through the umask
    remove_stale(path)
    sock = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        old = os.umask(0o177)  # no window in which the socket is open to others
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    except BaseException:
        sock.close()
        raise
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(backlog)
        return UnixListener(sock, path)
    except BaseException:
        sock.close()
        try:
            os.unlink(path)  # we made it: leave no socket file nobody listens on
        except OSError:
            pass
        raise
