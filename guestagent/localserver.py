"""The local API: a unix stream socket (default /run/ovmd/ovmd.sock) speaking the same protocol.

Who may connect (SO_PEERCRED): root, the daemon's own uid, or a member of the configured group
(primary gid, or a supplementary group in /proc/PID/status). Anyone else gets ``err denied``.
The socket is created mode 0600 (0660 and group-owned when a group is configured).

Each client is non-blocking with bounded input (the frame limit) and bounded output: a client
that does not read its replies is disconnected once its output is full, so it can never block
the daemon or the host link. ``wait`` registers a waiter that the change itself wakes.
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
MAX_CLIENTS = 64
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
    )

    def __init__(self, sock: socket.socket, pid: int, uid: int, outbox_limit: int) -> None:
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


class LocalServer:
    def __init__(
        self,
        loop: Loop,
        service: Service,
        path: str,
        group: str | None = None,
        max_clients: int = MAX_CLIENTS,
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self.loop = loop
        self.service = service
        self.path = path
        self.group = group
        self.max_clients = max_clients
        self.outbox_limit = outbox_limit
        self.clients: dict[int, _Client] = {}
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
            if len(self.clients) >= self.max_clients:
                self._warn.warn(
                    "refused",
                    "refused local client pid %d: %d clients already",
                    pid,
                    len(self.clients),
                )
                self._refuse(sock, "busy", "too many clients (%d)" % self.max_clients)
                continue
            client = _Client(sock, pid, uid, self.outbox_limit)
            self.clients[client.fd] = client
            self.loop.add(client.fd, IN, functools.partial(self._on_client, client))

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
        client.sock.close()

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
        if not data:
            # Half-closed (e.g. `socat` after its input ended): it still reads the answers.
            client.eof = True
            self._update(client)
            return
        handlers = self._handlers
        for event in client.reader.feed(data):
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
            self._update(client)

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
                self._update(client)  # a half-closed client may be finished now

        timer = self.loop.call_later(timeout, expired, timeout) if timeout is not None else None
        client.waits[token] = (result, timer)
