"""The host link: the protocol over the channel, and the channel's life (open, host absent, reopen).

States:
    DISCONNECTED  no host: the port reports EOF/HUP, or it is not open (missing, busy, a pty
                  whose master is gone). Nothing is written: the port would drop the bytes.
    CONNECTED     bytes flow, but no hello on this connection yet: reads are answered, host
                  set/del are refused (they may be stale bytes from an earlier connection, see
                  docs/virtio-serial.md), no ``changed`` is sent.
    SYNCED        the host's hello was answered: set/del applied exactly once by seq, and every
                  cache change is announced with ``changed``.

Host absent is a state, not an error. On the real port EOF and POLLHUP repeat at once forever
while no host is connected, so the descriptor is registered edge-triggered: the loop wakes on the
next edge (connect, data) and not before. On a tty, HUP/EIO means the pty's master is gone for
good: close it and reopen the path with backoff (the link may then point at a new pty).
"""

from __future__ import annotations

import errno
import logging
import os

from ovmproto import MIN_VERSION, PROTOCOL_VERSION
from ovmproto.codec import EntryReplies, decode, encode, quick_request
from ovmproto.errors import BadFrame, BadMessage, FrameTooLong, OvmError, ProtocolError
from ovmproto.framing import DELIMITER, FrameDecoder, Resync
from ovmproto.handshake import answer_hello
from ovmproto.limits import FRAME_MAX
from ovmproto.messages import Changed, Delete, Err, Get, Hello, Item, List, Ok, Ping, Set
from ovmsys.ratelimit import RateLimitedLog

from .channel import DEFAULT_PATH, READ_SIZE, Channel, find_port, is_hangup
from .loop import ET, IN, OUT, Loop, Outbox, Timer
from .service import AGENT, Service, error_reply, list_frames, ok_frame

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

log = logging.getLogger(__name__)

DISCONNECTED = "disconnected"
CONNECTED = "connected"
SYNCED = "synced"

OUTBOX_LIMIT = 1024 * 1024
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0


class HostLink:
    def __init__(
        self,
        loop: Loop,
        service: Service,
        path: str | None = None,
        on_state: Callable[[str, str], object] | None = None,
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self.loop = loop
        self.service = service
        self.configured_path = path  # None: find the port (udev link, then sysfs)
        self.on_state = on_state  # on_state(state, path) after every change of state
        self.state = DISCONNECTED
        self.channel: Channel | None = None
        self.bad_frames = 0
        self._frames = FrameDecoder()
        self._holding = False  # self._frames holds part of a frame (its in_frame, kept here)
        self._replies = EntryReplies()  # what a get answered lately, for a host that polls a key
        self._outbox = Outbox(outbox_limit)
        self._want_out = False
        # Changes announced while a host request is being answered.
        self._held: list[Changed] | None = None
        self._retry: Timer | None = None
        self._backoff = BACKOFF_FIRST
        self._proven = False  # bytes arrived since the channel was opened
        self._quiet = False  # opens keep failing at once (a pty hung up for good): log less
        self._closed = False
        self._warn = RateLimitedLog(log, 60.0)
        self._warn_open = RateLimitedLog(log, 300.0)  # a missing port may stay missing for long
        self._handlers: dict[type[object], Callable[[Any], None]] = {
            Ping: self._on_ping,
            Get: self._on_get,
            List: self._on_list,
            Set: self._on_set,
            Delete: self._on_delete,
            Hello: self._on_hello,
        }
        service.add_listener(self.announce)

    @property
    def path(self) -> str:
        if self.channel is not None:
            return self.channel.path
        return self.configured_path or DEFAULT_PATH

    # -- the channel's life -----------------------------------------------------------------

    def start(self) -> None:
        self._open()

    def reopen(self) -> None:
        """Close the channel and open it again now (SIGHUP)."""
        log.info("reopening the channel")
        self._close_channel()
        self._cancel_retry()
        self._backoff = BACKOFF_FIRST
        self._open()

    def close(self) -> None:
        self._closed = True
        self._cancel_retry()
        self._close_channel()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self.loop.cancel(self._retry)
            self._retry = None

    def _schedule_open(self) -> None:
        if self._closed or self._retry is not None:
            return
        self._retry = self.loop.call_later(self._backoff, self._retry_open)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _retry_open(self) -> None:
        self._retry = None
        self._open()

    def _open(self) -> None:
        if self._closed or self.channel is not None:
            return
        path = self.configured_path or find_port()
        if path is None:
            self._warn_open.warn(
                "open", "no virtio port %s yet; waiting for it to appear", DEFAULT_PATH
            )
            self._schedule_open()
            return
        try:
            channel = Channel.open(path)
        except OSError as e:
            if e.errno == errno.EBUSY:
                self._warn_open.warn(
                    "open", "%s is held by another process (only one may open it); retrying", path
                )
            elif e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                self._warn_open.warn("open", "%s is not there yet; waiting for it to appear", path)
            else:
                self._warn_open.warn("open", "cannot open %s: %s; retrying", path, e.strerror or e)
            self._schedule_open()
            return
        self.channel = channel
        self._proven = False
        self._frames.reset()
        self._holding = False
        self._outbox.clear()
        self._want_out = False
        log.log(
            logging.DEBUG if self._quiet else logging.INFO,
            "opened %s%s",
            path,
            " (a tty, set raw)" if channel.is_tty else "",
        )
        self.loop.add(channel.fd, IN | ET, self._on_events)
        # Read now: learn whether a host is there (EAGAIN) or not (EOF on the real port), and
        # take what it already wrote (edge-triggered, so nothing may be left behind).
        self._on_events(IN)

    def _close_channel(self) -> None:
        channel = self.channel
        if channel is None:
            return
        self.loop.remove(channel.fd)
        channel.close()
        self.channel = None
        self._set_state(DISCONNECTED)

    def _hangup(self) -> None:
        """A tty's master went away: this descriptor is dead; reopen the path later.

        The backoff restarts only after a connection that carried bytes: a pty that hangs up
        as soon as it is opened (its master closed, the device kept) is retried ever slower.
        """
        if self._proven or not self._quiet:
            log.info("the host closed %s; reopening it when it is back", self.path)
        if self._proven:
            self._backoff = BACKOFF_FIRST
        self._quiet = not self._proven
        self._close_channel()
        self._schedule_open()

    def _host_absent(self) -> None:
        """The real port's EOF: keep the descriptor, forget the connection, wait for an edge."""
        if self.state != DISCONNECTED:
            log.info("host disconnected from %s", self.path)
        self._set_state(DISCONNECTED)

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        if state == DISCONNECTED or self.state == DISCONNECTED:
            # A new connection starts clean: stale input and unsent output belong to the old one.
            self._frames.reset()
            self._holding = False
            self._outbox.clear()
            self._stop_out()
        self.state = state
        if self.on_state is not None:
            self.on_state(state, self.path)

    # -- input --------------------------------------------------------------------------------

    def _on_events(self, events: int) -> None:
        """The channel is ready: write what is queued, then read until the port has nothing more
        (edge-triggered: we will not be told again).

        This is the path of every request, so the commonest input, one whole ping or get with
        nothing held before it, is answered right here; every other read goes through _feed().
        (Each Python call on the way costs, more so on a CPU just woken: the caches are cold.)
        """
        if events & OUT and self.channel is not None:
            self._flush()
        while True:
            channel = self.channel
            if channel is None:
                return
            try:
                data = os.read(channel.fd, READ_SIZE)
            except BlockingIOError:
                if self.state == DISCONNECTED:
                    self._set_state(CONNECTED)  # no EOF: a host is there
                return
            except OSError as e:
                if channel.is_tty and is_hangup(e):
                    self._hangup()
                else:
                    self._warn.warn(
                        "io", "read error on %s: %s; reopening", channel.path, e.strerror or e
                    )
                    self._close_channel()
                    self._schedule_open()
                return
            if not data:
                if channel.is_tty:
                    self._hangup()
                else:
                    self._host_absent()
                return
            if not self._proven or self.state == DISCONNECTED:
                self._first_bytes()
            # quick_request() refuses a frame holding a delimiter or a RESYNC, so data that it
            # reads as a request is exactly one frame.
            quick = (
                quick_request(data[:-1])
                if data[-1:] == DELIMITER and not self._holding and len(data) <= FRAME_MAX
                else None
            )
            if quick is None:
                self._feed(data)
            elif quick[1] is None:
                self._send(b'{"t":"ok","id":%d}\n' % quick[0])  # what ok_frame() writes
            else:
                self._answer_get(quick[0], quick[1])
            if channel.is_tty and len(data) < READ_SIZE:
                # A tty's short read took all it had; more bytes make a new edge. (Not so on
                # the virtio port: a read returns one 4 KiB buffer of possibly several.)
                return

    def _first_bytes(self) -> None:
        """Bytes arrived: a host is there, and this descriptor works (the backoff restarts)."""
        if not self._proven:
            self._proven = True
            self._quiet = False
            self._backoff = BACKOFF_FIRST
            self._warn_open.reset("open")
        if self.state == DISCONNECTED:
            self._set_state(CONNECTED)

    def _feed(self, data: bytes) -> None:
        handlers = self._handlers
        frames = self._frames.feed(data)
        self._holding = self._frames.in_frame
        for frame in frames:
            if type(frame) is not bytes:
                if isinstance(frame, Resync):
                    # The host starts over (a hello follows): stop announcing until it has synced.
                    if self.state == SYNCED:
                        self._set_state(CONNECTED)
                elif isinstance(frame, FrameTooLong):
                    self._on_bad(frame)
                continue
            # The host's pings and gets, answered without building a message: the same answers
            # as _on_ping and _on_get give.
            quick = quick_request(frame)
            if quick is not None:
                request_id, key = quick
                if key is None:
                    self._send(ok_frame(request_id))
                else:
                    self._answer_get(request_id, key)
                continue
            try:
                msg = decode(frame)
            except (BadFrame, BadMessage) as e:
                self._on_bad(e)
                continue
            handler = handlers.get(type(msg))
            if handler is not None:
                handler(msg)
                continue
            msg_id = getattr(msg, "id", None)
            if msg_id is not None and type(msg) not in (Ok, Err, Item):
                self._send(
                    encode(
                        Err(
                            id=msg_id,
                            code="bad_request",
                            msg="%r is a local request, not accepted from the host" % msg.TYPE,
                        )
                    )
                )
            # ok, err, item and changed from the host are never answered

    def _on_bad(self, err: ProtocolError) -> None:
        self.bad_frames += 1
        self._warn.warn(
            "bad_frame", "bad frame from the host (%d so far): %s", self.bad_frames, err.message
        )
        request_id = getattr(err, "request_id", None)
        if request_id is not None:
            self._send(error_reply(request_id, err))

    # -- requests -----------------------------------------------------------------------------

    def _on_hello(self, msg: Hello) -> None:
        service = self.service
        if msg.epoch is not None and msg.v >= MIN_VERSION:
            try:
                service.follow_epoch(msg.epoch)
            except OvmError as e:
                self._send(error_reply(msg.id, e))
                return
        cache = service.cache
        # Anything still queued answers requests from before this hello: the host ignores it,
        # and the RESYNC leading the reply makes it drop a partly sent frame.
        self._outbox.clear()
        self._stop_out()
        self._send(
            answer_hello(
                msg, AGENT, cache.gid, cache.gseq, cache.epoch, cache.hseq, PROTOCOL_VERSION
            )
        )
        if msg.v >= MIN_VERSION and self.channel is not None:
            self._set_state(SYNCED)
            log.info(
                "host synced (epoch %s, hseq %d, gseq %d)", cache.epoch, cache.hseq, cache.gseq
            )

    def _on_ping(self, msg: Ping) -> None:
        self._send(ok_frame(msg.id))

    def _on_get(self, msg: Get) -> None:
        self._answer_get(msg.id, msg.key)

    def _answer_get(self, request_id: int, key: str) -> None:
        entry = self.service.get(key)
        if entry is None:
            self._send(encode(Err(id=request_id, code="not_found", msg="no such key")))
        else:
            self._send(self._replies.ok(request_id, entry.key, entry.value, entry.ts, entry.origin))

    def _on_list(self, msg: List) -> None:
        self._send_stream(list_frames(msg.id, self.service.entries(), self.service.cache.gseq))

    def _refuse_unsynced(self, msg: Set | Delete) -> bool:
        if self.state == SYNCED:
            return False
        self._send(
            encode(
                Err(
                    id=msg.id,
                    code="busy",
                    msg="send hello first: this connection is not synchronized",
                )
            )
        )
        return True

    def _on_set(self, msg: Set) -> None:
        if self._refuse_unsynced(msg):
            return
        self._held = []  # the host hears its ok first, then the `changed` it caused
        try:
            dup = self.service.host_set(msg.seq, msg.key, msg.value)
        except OvmError as e:
            log.info("host set of key %r refused: %s", msg.key, e.code)
            self._send(error_reply(msg.id, e))
        else:
            self._send(encode(Ok(id=msg.id, seq=msg.seq, dup=True if dup else None)))
        finally:
            # Whatever failed, never leave changes held: every later one would be held too.
            self._release_held()

    def _on_delete(self, msg: Delete) -> None:
        if self._refuse_unsynced(msg):
            return
        self._held = []
        try:
            dup, found = self.service.host_delete(msg.seq, msg.key)
        except OvmError as e:
            self._send(error_reply(msg.id, e))
        else:
            self._send(encode(Ok(id=msg.id, seq=msg.seq, found=found, dup=True if dup else None)))
        finally:
            self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for changed in held or ():
            self.announce(changed)

    # -- output -------------------------------------------------------------------------------

    def announce(self, changed: Changed) -> None:
        """A listener of the service: tell a synced host about every change."""
        self._replies.forget(changed.key)  # None (a clear): everything
        if self._held is not None:
            self._held.append(changed)
        elif self.state == SYNCED:
            self._send(encode(changed))

    def _send(self, data: bytes) -> None:
        channel = self.channel
        if self.state == DISCONNECTED or channel is None:
            return  # the port would drop it; the host resyncs and asks again
        try:
            if not self._want_out:
                # Nothing is queued (output is queued exactly while OUT is asked for, see
                # _start_out): write now, queue only what the port did not take.
                n = channel.write(data)
                if n == len(data):
                    return
                data = data[n:]
        except OSError as e:
            self._write_failed(channel, e)
            return
        if self._outbox.add(data):
            self._start_out()
        else:
            self._overflow()

    def _send_stream(self, frames: Iterator[bytes]) -> None:
        if self.state == DISCONNECTED or self.channel is None:
            return
        if not self._outbox.add_stream(frames):
            self._overflow()
            return
        self._flush()

    def _flush(self) -> None:
        channel = self.channel
        if channel is None:
            return  # closed: nothing to write to
        try:
            done = self._outbox.flush(channel.write)
        except OSError as e:
            self._write_failed(channel, e)
            return
        if done:
            self._stop_out()
        else:
            self._start_out()

    def _start_out(self) -> None:
        if not self._want_out and self.channel is not None:
            self._want_out = True
            self.loop.modify(self.channel.fd, IN | OUT | ET)

    def _stop_out(self) -> None:
        if self._want_out and self.channel is not None:
            self._want_out = False
            self.loop.modify(self.channel.fd, IN | ET)
        self._want_out = False

    def _write_failed(self, channel: Channel, err: OSError) -> None:
        if channel.is_tty and is_hangup(err):
            self._hangup()
        else:
            self._warn.warn("io", "write error on %s: %s", channel.path, err.strerror or err)
            self._outbox.clear()
            self._stop_out()
            if self.state == SYNCED:
                self._set_state(CONNECTED)

    def _overflow(self) -> None:
        log.warning(
            "the host is not reading: dropped %d bytes of output; it must send hello again",
            self._outbox.size,
        )
        self._outbox.clear()
        self._stop_out()
        if self.state == SYNCED:
            self._set_state(CONNECTED)
