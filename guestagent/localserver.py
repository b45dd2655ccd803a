"""The local API: a unix stream socket (default /run/ovmd/ovmd.sock) speaking the same protocol.

Who may connect (SO_PEERCRED): root, the daemon's own uid, or a member of the configured group
(primary gid, or a supplementary group in /proc/PID/status). Anyone else gets ``err denied``.
The socket is created mode 0600 (0660 and group-owned when a group is configured).

Each client is non-blocking with bounded input (the frame limit) and bounded output: a client
that does not read its replies is disconnected once its output is full, so it can never block
the daemon or the host link. ``wait`` registers a waiter that the change itself wakes.

No local user can take the socket away from root (docs/reliability.md): every uid but root's (and
the daemon's own) holds at most ``max_clients_per_user`` connections, and the last
``reserved_root_clients`` of ``max_clients`` are for root alone. A client that leaves a request
unfinished for ``request_timeout`` seconds, or has nothing in progress for ``idle_timeout``
seconds, is disconnected; one blocked in a ``wait`` is not: the wait has its own timeout, if any.
One timer, at the earliest deadline, checks them all: nothing runs while no client is connected,
and a request costs no timer bookkeeping.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import socket
import struct

from ovmproto.codec import Reader, encode
from ovmproto.errors import OvmError, ProtocolError
from ovmproto.framing import Resync
from ovmproto.handshake import answer_hello
from ovmproto.messages import (
    Clear,
    Delete,
    Err,
    Events,
    Get,
    Hello,
    List,
    Message,
    Ok,
    Ping,
    PostEvent,
    Put,
    Set,
    Wait,
)
from ovmsys import unixsocket
from ovmsys.ratelimit import RateLimitedLog

from .cache import Entry
from .loop import ERR, HUP, IN, OUT, Loop, Outbox, Timer
from .service import AGENT, Service, Waiter, error_reply, list_frames, ok_frame

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    from .loop import Write

    _R = TypeVar("_R")

log = logging.getLogger(__name__)

ORIGIN = "guest"
# The defaults of guestagent.config (max_clients, ...): docs/cli.md and docs/reliability.md.
MAX_CLIENTS = 64
MAX_CLIENTS_PER_USER = 16
RESERVED_ROOT_CLIENTS = 4
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its end of line
IDLE_TIMEOUT = 300.0  # seconds without a byte in or out, nothing pending
OUTBOX_LIMIT = 256 * 1024
MAX_WAITS = 64  # pending waits per client
RECV_SIZE = 65536
_PEERCRED = struct.Struct("3i")


class LocalServerError(OvmError):
    code = "internal"


def supplementary_groups(pid: int) -> set[int]:
    """The groups of process ``pid`` (from /proc/PID/status), or an empty set."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _write_to(sock: socket.socket) -> Write:
    def write(data: bytes | bytearray) -> int:
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0

    return write


class _Client:
    __slots__ = (
        "sock",
        "fd",
        "pid",
        "uid",
        "reader",
        "outbox",
        "write",
        "waits",
        "mask",
        "eof",
        "closed",
        "active",
        "partial_since",
    )

    def __init__(
        self, sock: socket.socket, pid: int, uid: int, outbox_limit: int, now: float
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.uid = uid
        self.reader = Reader()
        self.outbox = Outbox(outbox_limit)
        self.write = _write_to(sock)
        self.waits: dict[int, tuple[Waiter, Timer | None]] = {}  # by token
        self.mask = IN  # the epoll events we asked for
        self.eof = False  # the client shut its writing side: answer what it asked, then close
        self.closed = False
        self.active = now  # when a byte last went in or out
        self.partial_since: float | None = None  # when its unfinished request began


class LocalServer:
    def __init__(
        self,
        loop: Loop,
        service: Service,
        path: str,
        group: str | None = None,
        max_clients: int = MAX_CLIENTS,
        outbox_limit: int = OUTBOX_LIMIT,
        max_clients_per_user: int = MAX_CLIENTS_PER_USER,
        reserved_root_clients: int = RESERVED_ROOT_CLIENTS,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.service = service
        self.path = path
        self.group = group
        self.max_clients = max_clients
        self.outbox_limit = outbox_limit
        self.max_clients_per_user = max_clients_per_user
        # At least one slot stays root's, however the numbers were configured.
        self.reserved_root_clients = max(1, min(reserved_root_clients, max_clients - 1))
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.clients: dict[int, _Client] = {}
        self._per_uid: dict[int, int] = {}  # connected clients by uid
        self._sweep: Timer | None = None  # the one timer that enforces the timeouts
        self._listener: unixsocket.UnixListener | None = None
        self._gid: int | None = None
        self._uid = os.getuid()
        self._wait_token = 0
        self._warn = RateLimitedLog(log, 60.0)
        self._handlers: dict[type[object], Callable[[_Client, Any], None]] = {
            Ping: self._on_ping,
            Get: self._on_get,
            List: self._on_list,
            Set: self._on_set,
            Put: self._on_put,
            Delete: self._on_delete,
            Clear: self._on_clear,
            Wait: self._on_wait,
            Events: self._on_events,
            PostEvent: self._on_event,
            Hello: self._on_hello,
        }

    # -- the listening socket ---------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; raise LocalServerError (one line) when that is impossible."""
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise LocalServerError("group %r does not exist" % self.group) from None
        try:
            self._listener = unixsocket.listen(
                self.path, 0o600 if self._gid is None else 0o660, self._gid
            )
        except unixsocket.SocketInUse:
            raise LocalServerError("another daemon is listening on %s" % self.path) from None
        except OSError as e:
            raise LocalServerError(
                "cannot listen on %s: %s" % (self.path, e.strerror or e)
            ) from None
        self.loop.add(self._listener.fileno(), IN, self._on_accept)
        log.info("listening on %s", self.path)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        if self._listener is not None:
            self.loop.remove(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _on_accept(self, events: int) -> None:
        while self._listener is not None:
            try:
                sock, _ = self._listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: leave the connection queued, say so (rate-limited).
                self._warn.warn("refused", "cannot accept a local client: %s", e.strerror or e)
                return
            sock.setblocking(False)
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if not self._allowed(pid, uid, gid):
                self._warn.warn(
                    "refused",
                    "refused local client pid %d uid %d: not root, uid %d or in group %s",
                    pid,
                    uid,
                    self._uid,
                    self.group,
                )
                self._refuse(
                    sock,
                    "denied",
                    "uid %d may not use ovmd (root, uid %d or group %s)"
                    % (uid, self._uid, self.group or "-"),
                )
                continue
            full = self._full(uid)
            if full is not None:
                # One line per uid and minute: a flooding user cannot hide another's refusals.
                self._warn.warn(
                    "busy-%d" % uid,
                    "refused local client pid %d uid %d: %s",
                    pid,
                    uid,
                    full,
                )
                self._refuse(sock, "busy", "too many clients: %s" % full)
                continue
            client = _Client(sock, pid, uid, self.outbox_limit, self.loop.clock())
            self.clients[client.fd] = client
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            self.loop.add(client.fd, IN, functools.partial(self._on_client, client))
            self._arm(client.active + self.idle_timeout)

    def _full(self, uid: int) -> str | None:
        """Why a new client of ``uid`` cannot have a slot now (the refusal's text), or None."""
        total = len(self.clients)
        if total >= self.max_clients:
            return "%d connected, the limit is %d" % (total, self.max_clients)
        if uid == 0 or uid == self._uid:
            return None
        shared = self.max_clients - self.reserved_root_clients
        if total >= shared:
            return "%d connected, the limit is %d (the other %d are kept for root)" % (
                total,
                shared,
                self.reserved_root_clients,
            )
        mine = self._per_uid.get(uid, 0)
        if mine >= self.max_clients_per_user:
            return "uid %d has %d connected, the limit per user is %d" % (
                uid,
                mine,
                self.max_clients_per_user,
            )
        return None

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid == 0 or uid == self._uid:
            return True
        if self._gid is None:
            return False
        return gid == self._gid or self._gid in supplementary_groups(pid)

    @staticmethod
    def _refuse(sock: socket.socket, code: str, msg: str) -> None:
        try:
            sock.send(encode(Err(code=code, msg=msg)))
        except OSError:
            pass  # it is going away either way
        sock.close()

    # -- clients ------------------------------------------------------------------------------

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        for waiter, timer in client.waits.values():
            waiter.cancel()
            self.loop.cancel(timer)
        client.waits.clear()
        self.loop.remove(client.fd)
        self.clients.pop(client.fd, None)
        left = self._per_uid.get(client.uid, 1) - 1
        if left > 0:
            self._per_uid[client.uid] = left
        else:
            self._per_uid.pop(client.uid, None)
        client.sock.close()
        if not self.clients and self._sweep is not None:
            self.loop.cancel(self._sweep)  # nobody left to check: no wakeups while idle
            self._sweep = None

    # -- timeouts -----------------------------------------------------------------------------

    def _deadline(self, client: _Client) -> float | None:
        """When ``client`` is to be disconnected if nothing changes; None: not while it waits."""
        if client.partial_since is not None:
            return client.partial_since + self.request_timeout
        if client.waits:
            return None  # in a documented wait (`ovmd -w`): its own timeout, if any, ends it
        return client.active + self.idle_timeout

    def _arm(self, when: float) -> None:
        """Make sure the sweep runs no later than ``when``."""
        sweep = self._sweep
        if sweep is not None and not sweep.cancelled and sweep.when <= when:
            return
        self.loop.cancel(sweep)
        self._sweep = self.loop.call_later(when - self.loop.clock(), self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep = None
        now = self.loop.clock()
        earliest: float | None = None
        for client in list(self.clients.values()):
            deadline = self._deadline(client)
            if deadline is None:
                continue
            if deadline <= now:
                self._expire(client)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if self.clients:
            # Clients in a wait have no deadline now; look again after idle_timeout all the same.
            later = now + self.idle_timeout
            self._arm(later if earliest is None else min(earliest, later))

    def _expire(self, client: _Client) -> None:
        if client.partial_since is not None:
            why = "did not finish its request within %gs" % self.request_timeout
        else:
            why = "was idle for %gs" % self.idle_timeout
        self._warn.warn(
            "timeout-%d" % client.uid,
            "local client pid %d uid %d %s; disconnected",
            client.pid,
            client.uid,
            why,
        )
        if not client.outbox:  # else a line would land inside a frame the client has not read
            try:
                client.sock.send(encode(Err(code="busy", msg="disconnected: the client " + why)))
            except OSError:
                pass  # it is going away either way
        self._drop(client)

    def _on_client(self, client: _Client, events: int) -> None:
        if events & OUT:
            self._flush(client)
        if client.closed:
            return
        if client.eof:
            if events & (HUP | ERR):
                self._drop(client)  # gone both ways: nobody is left to answer
            return
        if not events & (IN | HUP | ERR):
            return
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.active = now = self.loop.clock()
        if not data:
            # Half-closed (e.g. `socat` after its input ended): it still reads the answers.
            client.eof = True
            client.partial_since = None  # an unfinished request never will be now
            self._update(client)
            return
        handlers = self._handlers
        reader = client.reader
        received = reader.feed(data)
        if not reader.in_frame:
            client.partial_since = None
        elif client.partial_since is None or any(type(e) is not Resync for e in received):
            # A request began in this read: from now on it has request_timeout to end. A RESYNC
            # byte alone does not restart the clock (it is not a request).
            client.partial_since = now
            self._arm(now + self.request_timeout)
        for event in received:
            if client.closed:
                return
            handler = handlers.get(type(event))
            if handler is not None:
                handler(client, event)
            elif isinstance(event, ProtocolError):
                self._warn.warn(
                    "bad_frame", "bad frame from local client pid %d: %s", client.pid, event.message
                )
                # Answer even without a usable id: a local client waits for one answer, and
                # silence would look like a hung daemon (the host link, by contrast, never
                # answers id-less garbage: it may be stale bytes of an earlier connection).
                self._send(client, error_reply(getattr(event, "request_id", None), event))
            elif isinstance(event, Message):
                request_id = getattr(event, "id", None)
                if request_id is not None and event.TYPE not in ("ok", "err", "item"):
                    self._send(
                        client,
                        encode(
                            Err(
                                id=request_id,
                                code="bad_request",
                                msg="%r is not a request" % event.TYPE,
                            )
                        ),
                    )

    def _send(self, client: _Client, data: bytes) -> None:
        if client.closed:
            return
        client.active = self.loop.clock()  # e.g. a wait that ended: idle from now on
        try:
            ok = client.outbox.send(data, client.write)
        except OSError:
            self._drop(client)
            return
        if not ok:
            self._overflow(client)
        elif client.outbox or client.eof:
            self._update(client)

    def _send_stream(self, client: _Client, frames: Iterator[bytes]) -> None:
        if client.closed:
            return
        if not client.outbox.add_stream(frames):
            self._overflow(client)
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        client.active = self.loop.clock()
        try:
            client.outbox.flush(client.write)
        except OSError:
            self._drop(client)
            return
        self._update(client)

    def _update(self, client: _Client) -> None:
        """Ask epoll for what the client needs now; close it when it is finished."""
        if client.closed:
            return
        if client.eof and not client.outbox and not client.waits:
            self._drop(client)
            return
        mask = (0 if client.eof else IN) | (OUT if client.outbox else 0)
        if mask != client.mask:
            client.mask = mask
            self.loop.modify(client.fd, mask)

    def _overflow(self, client: _Client) -> None:
        self._warn.warn(
            "refused",
            "local client pid %d does not read its replies (%d bytes waiting); disconnected",
            client.pid,
            client.outbox.size,
        )
        self._drop(client)

    # -- requests -----------------------------------------------------------------------------

    def _ok(self, client: _Client, request_id: int, **fields: Any) -> None:
        self._send(client, encode(Ok(id=request_id, **fields)))

    def _err(self, client: _Client, request_id: int, code: str, msg: str) -> None:
        self._send(client, encode(Err(id=request_id, code=code, msg=msg)))

    def _on_ping(self, client: _Client, msg: Ping) -> None:
        self._send(client, ok_frame(msg.id))

    def _on_hello(self, client: _Client, msg: Hello) -> None:
        cache = self.service.cache
        self._send(client, answer_hello(msg, AGENT, cache.gid, cache.gseq, cache.epoch, cache.hseq))

    def _on_get(self, client: _Client, msg: Get) -> None:
        entry = self.service.get(msg.key)
        if entry is None:
            self._err(client, msg.id, "not_found", "no such key")
        else:
            self._ok(
                client, msg.id, key=entry.key, value=entry.value, ts=entry.ts, origin=entry.origin
            )

    def _on_list(self, client: _Client, msg: List) -> None:
        self._send_stream(
            client, list_frames(msg.id, self.service.entries(), self.service.cache.gseq)
        )

    def _on_events(self, client: _Client, msg: Events) -> None:
        self._send_stream(client, list_frames(msg.id, self.service.events()))

    def _mutate(
        self,
        client: _Client,
        msg: Set | Put | Delete | Clear | PostEvent,
        operation: Callable[..., _R],
        *args: Any,
    ) -> tuple[bool, _R | None]:
        if getattr(msg, "seq", None) is not None:
            self._err(
                client, msg.id, "bad_request", "seq is for the host; local requests have none"
            )
            return False, None
        try:
            return True, operation(*args)
        except OvmError as e:
            self._send(client, error_reply(msg.id, e))
            return False, None

    def _on_set(self, client: _Client, msg: Set) -> None:
        ok, _ = self._mutate(client, msg, self.service.set, msg.key, msg.value, ORIGIN)
        if ok:
            self._send(client, ok_frame(msg.id))

    def _on_put(self, client: _Client, msg: Put) -> None:
        ok, _ = self._mutate(client, msg, self.service.put, msg.items, ORIGIN)
        if ok:
            self._send(client, ok_frame(msg.id))

    def _on_delete(self, client: _Client, msg: Delete) -> None:
        ok, change = self._mutate(client, msg, self.service.delete, msg.key, ORIGIN)
        if ok:
            self._ok(client, msg.id, found=change is not None)

    def _on_clear(self, client: _Client, msg: Clear) -> None:
        ok, _ = self._mutate(client, msg, self.service.clear, ORIGIN)
        if ok:
            self._send(client, ok_frame(msg.id))

    def _on_event(self, client: _Client, msg: PostEvent) -> None:
        ok, _ = self._mutate(client, msg, self.service.post_event, msg.value)
        if ok:
            self._send(client, ok_frame(msg.id))

    def _on_wait(self, client: _Client, msg: Wait) -> None:
        timeout = msg.timeout
        if timeout is not None and timeout < 0:
            self._err(client, msg.id, "bad_request", "timeout must not be negative")
            return
        if len(client.waits) >= MAX_WAITS:
            self._err(client, msg.id, "busy", "too many waits on this connection (%d)" % MAX_WAITS)
            return
        self._wait_token += 1
        token = self._wait_token

        def woken(entry: Entry) -> None:
            _, timer = client.waits.pop(token, (None, None))
            self.loop.cancel(timer)
            self._ok(
                client, msg.id, key=entry.key, value=entry.value, ts=entry.ts, origin=entry.origin
            )
            self._waited(client)

        result = self.service.wait(msg.key, woken, changed=bool(msg.changed))
        if not isinstance(result, Waiter):
            self._ok(
                client,
                msg.id,
                key=result.key,
                value=result.value,
                ts=result.ts,
                origin=result.origin,
            )
            return

        def expired(seconds: float) -> None:
            waiter, _ = client.waits.pop(token, (None, None))
            if waiter is not None:
                waiter.cancel()
                self._err(
                    client, msg.id, "timeout", "key %r was not set within %gs" % (msg.key, seconds)
                )
                self._waited(client)

        timer = self.loop.call_later(timeout, expired, timeout) if timeout is not None else None
        client.waits[token] = (result, timer)

    def _waited(self, client: _Client) -> None:
        """A wait of ``client`` ended: it may be finished, or idle from now on."""
        self._update(client)  # a half-closed client may be finished now
        if not client.closed and not client.waits:
            self._arm(client.active + self.idle_timeout)
