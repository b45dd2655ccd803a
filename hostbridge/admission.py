"""Who may hold a connection to the TCP API, and for how long: the bridge's own accept loop.

asyncio's accept loop takes every connection it can, and when the process runs out of
descriptors it logs "socket.accept() out of system resource" and retries at once, for ever. A
thousand clients that open TLS connections, send half a request and wait (no credentials needed)
then leave the bridge no descriptor to reach its guests or answer on its unix socket. So the TCP
listener is accepted here instead, and every connection is admitted or closed at once:

* at most ``max_connections`` open, and never so many that fewer than ``fd_reserve()``
  descriptors stay free under RLIMIT_NOFILE: those are for guest channels, the database and the
  unix API, which network clients can never take;
* at most ``max_per_address`` connections per source address that have not yet made an
  authenticated request, and ``max_unauthenticated`` of those in all: past that the oldest of
  them is closed to make room (refusing the newcomer would let whoever holds the slots lock
  every real client out);
* the TLS handshake must finish within ``handshake_timeout``, and a connection must make an
  authenticated request within ``auth_timeout`` of its accept, or it is closed (a slow or
  half-sent request included);
* out of descriptors anyway (EMFILE/ENFILE): accepting pauses, 0.1 s doubling to 2 s.

The limits are the config's `[api]` table (hostbridge.config.ApiLimits). Refusals are
logged at most once per LOG_INTERVAL per kind, with a count. The API's middleware marks a
connection authenticated (``Admission.authenticated``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ovmsys.ratelimit import RateLimitedLog

from .config import ApiLimits

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Conn:
    __slots__ = ("address", "authenticated", "transport", "timer", "task")

    def __init__(self, address: str) -> None:
        self.address = address
        self.authenticated = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # the handshake, until it is done


def open_files() -> int:
    """Descriptors this process has open (0 when /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Admission:
    """The accept loop of one TCP listener; ``factory()`` makes the HTTP protocol per connection
    (aiohttp's server); ``guests()`` says how many guest channels the bridge may need."""

    def __init__(
        self,
        factory: Callable[[], Any],
        ctx: ssl.SSLContext,
        limits: ApiLimits | None = None,
        guests: Callable[[], int] = lambda: 0,
    ) -> None:
        self.factory = factory
        self.ctx = ctx
        self.limits = limits or ApiLimits()
        self.guests = guests
        self.conns: dict[_Conn, None] = {}  # the open connections, oldest first
        self.refused: dict[str, int] = {}
        self._unauthenticated_by_address: dict[str, int] = {}
        self._warn = RateLimitedLog(log, LOG_INTERVAL)
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the listener --------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(), name="api-tcp")
        address = sock.getsockname()
        return address[0], address[1]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()

    def _files_left(self) -> int:
        """Descriptors free under the soft limit beyond the reserve for guests and the rest."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.limits.max_connections
        return soft - open_files() - self.limits.fd_reserve - self.guests()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        pause = 0.1
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno not in _OUT_OF_FILES:
                    raise
                self._refuse("out_of_files", "accept failed: %s; pausing %.1f s" % (exc, pause))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            pause = 0.1
            address = str(peer[0])
            refusal = self._over_limit(address)
            if refusal is not None:
                kind, reason = refusal
                # Counted before the close: whoever sees the close may read the count.
                self._refuse(kind, "refused a connection from %s: %s" % (address, reason))
                sock.close()
                continue
            conn = _Conn(address)
            self._admit(conn)
            conn.task = task = loop.create_task(self._hand_over(sock, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _over_limit(self, address: str) -> tuple[str, str] | None:
        """(kind, reason) when a connection from ``address`` must be refused, else None."""
        open_now = len(self.conns)
        if open_now >= self.limits.max_connections:
            return "max_connections", "%d connections open, the limit" % open_now
        if self._unauthenticated_by_address.get(address, 0) >= self.limits.max_per_address:
            return "max_per_address", "%d connections from it not yet authenticated" % (
                self.limits.max_per_address
            )
        # Last of the refusals: it lists /proc/self/fd, the one check that is not O(1).
        if self._files_left() <= 0:
            return "fd_reserve", "the last descriptors are kept for guests and the unix API"
        waiting = sum(self._unauthenticated_by_address.values())
        if waiting >= self.limits.max_unauthenticated:
            # Make room by closing the oldest waiting connection, not by refusing the new one:
            # else whoever holds the slots (from many addresses) locks every new client out,
            # while a real client authenticates within milliseconds of its accept.
            self._evict_oldest()
        return None

    def _evict_oldest(self) -> None:
        oldest = next((c for c in self.conns if not c.authenticated), None)
        if oldest is None:
            return
        self._refuse(
            "max_unauthenticated",
            "closed the oldest unauthenticated connection (from %s): %d wait, the limit"
            % (oldest.address, self.limits.max_unauthenticated),
        )
        self._close(oldest)
        self._release(oldest)  # now: the new connection takes its place at once

    def _refuse(self, kind: str, message: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        self._warn.warn(kind, "%s", message)

    # -- one connection ------------------------------------------------------------------------

    def _admit(self, conn: _Conn) -> None:
        self.conns[conn] = None
        by = self._unauthenticated_by_address
        by[conn.address] = by.get(conn.address, 0) + 1
        conn.timer = asyncio.get_running_loop().call_later(
            self.limits.auth_timeout, self._expire, conn
        )

    def _release(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        del self.conns[conn]
        if conn.timer is not None:
            conn.timer.cancel()
        if not conn.authenticated:
            self._uncount(conn)

    def _uncount(self, conn: _Conn) -> None:
        by = self._unauthenticated_by_address
        left = by.get(conn.address, 1) - 1
        if left > 0:
            by[conn.address] = left
        else:
            by.pop(conn.address, None)

    def _expire(self, conn: _Conn) -> None:
        if conn.authenticated:
            return
        self._refuse(
            "auth_timeout",
            "closed a connection from %s: no authenticated request within %g s"
            % (conn.address, self.limits.auth_timeout),
        )
        self._close(conn)

    @staticmethod
    def _close(conn: _Conn) -> None:
        """Drop ``conn`` at once; it is released when its protocol (connection_lost) or, still
        in its handshake, _hand_over sees it go."""
        if conn.transport is not None:
            conn.transport.abort()
        elif conn.task is not None:
            conn.task.cancel()

    async def _hand_over(self, sock: socket.socket, conn: _Conn) -> None:
        def factory() -> Any:
            protocol = self.factory()
            protocol.admission = (self, conn)
            return protocol

        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, ssl=self.ctx, ssl_handshake_timeout=self.limits.handshake_timeout
            )
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            why = type(exc).__name__
            self._refuse("handshake", "TLS handshake with %s failed: %s" % (conn.address, why))
            self._release(conn)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            self._release(conn)
            raise
        conn.task = None
        if conn not in self.conns:  # closed meanwhile
            transport.abort()
            return
        conn.transport = transport

    def authenticated(self, conn: _Conn) -> None:
        """The connection made an authenticated request: no longer counted as waiting."""
        if not conn.authenticated and conn in self.conns:
            conn.authenticated = True
            self._uncount(conn)
            if conn.timer is not None:
                conn.timer.cancel()

    def lost(self, conn: _Conn) -> None:
        self._release(conn)


__all__ = ["Admission", "open_files"]
