"""One guest: its channel, the protocol on it, its mirror and the delivery of its outbox.

States (``Session.state``):

    DISCONNECTED  no link, and not trying (no channel, or between a lost link and the next try)
    CONNECTING    establishing the link (unix: connect() with backoff; pty: waiting for a guest
                  program to open it); VmInfo shows both as agent "disconnected"
    SYNCING       link up, a hello sent (RESYNC + hello with a fresh nonce); every frame is
                  ignored until the reply that echoes the nonce. Unanswered hellos are repeated
                  (1 s doubling to 5 s, a fresh nonce each time): on a unix channel QEMU accepts
                  the connection whether or not an agent runs in the guest.
    SYNCED        the stream is trusted: requests, `changed` frames, outbox delivery.

A request timeout sends the session back to SYNCING (new hello, new nonce): after a timeout the
stream is not trusted until it has been resynchronized. Every request still waiting then fails.

One reader task per session reads the channel, pays the rate limit (token buckets on frames and
bytes: when a guest sends more, we stop reading it for a while, which pushes back on it through
the channel) and dispatches: replies to the id->future map, `changed` to the mirror.

Never log a value: keys and sizes only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time

from ovmproto.codec import Reader, encode
from ovmproto.errors import ProtocolError, RemoteError
from ovmproto.framing import Resync
from ovmproto.handshake import Handshake
from ovmproto.messages import REQUEST_TYPES, Changed, Delete, Err, Item, List, Ok, Ping, Set
from ovmsys.ratelimit import RateLimitedLog as WarnOnce

from . import errors
from .channels import Channel, ChannelClosed, ChannelFull
from .config import Limits
from .mirror import Mirror
from .ratelimit import TokenBucket
from .store import MirrorRow, Store

log = logging.getLogger(__name__)

REFRESH_TIMEOUT = 15.0  # a full list of a large cache over a slow port
HELD_CHANGES_MAX = 4096  # changes held during one refresh; past that, list again


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    SYNCING = "syncing"
    SYNCED = "synced"

    @property
    def agent(self) -> str:
        """VmInfo.agent: connected (synced) | connecting (link up, no answer yet) | disconnected."""
        return {
            "synced": "connected",
            "syncing": "connecting",
            "connecting": "disconnected",
            "disconnected": "disconnected",
        }[self.value]


class GuestError(errors.BridgeError):
    """The guest answered a request with `err`; ``code`` is the guest's (e.g. "quota")."""

    http_status = 409


class LinkReset(errors.AgentNotConnected):
    """The link was lost or resynchronized while the request waited; its reply will not come."""


class _Pending:
    __slots__ = ("fut", "items", "item_bytes")

    def __init__(self, fut, collect):
        self.fut = fut
        self.items = [] if collect else None
        self.item_bytes = 0


class Session:
    def __init__(
        self,
        name: str,
        store: Store,
        limits: Limits,
        channel_spec: str | None = None,
        source: str | None = None,
    ):
        self.name = name
        self.channel: Channel | None = None  # attach() gives it one
        self.store = store
        self.limits = limits
        self.log = log.getChild(name.replace(".", "_"))
        self.warn = WarnOnce(self.log)
        row = store.vm(name, channel_spec, source)
        self.channel_spec = channel_spec or row.channel or ""
        self.source = source or row.source or "config"
        self.epoch = row.epoch
        self.last_seen: float | None = row.last_seen
        self.mirror = Mirror(limits.mirror_keys, limits.mirror_bytes, store.hidden(name))
        self.mirror.load(store.mirror(name), row.gid, row.gseq)
        self.state = State.DISCONNECTED
        self.agent_version: str | None = None
        self.connected_since: float | None = None
        self.counters = {
            "frames_in": 0,
            "frames_out": 0,
            "bad_frames": 0,
            "dropped_rate_limited": 0,
            "timeouts": 0,
            "resyncs": 0,
            "reconnects": 0,
        }
        self._ids = itertools.count(1)  # never reused, so a late reply never matches a new request
        self._pending: dict[int, _Pending] = {}
        self._handshake: Handshake | None = None
        self._hello_interval = limits.hello_interval
        self._hello_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_frame = 0.0  # monotonic time of the last frame from the guest
        self._guest_gid: str | None = None
        self._seen_gseq: int | None = None
        self._refreshing = False
        self._held_changes: list[Changed] = []  # changes that arrived during a refresh
        self._held_overflow = False
        self._frames = TokenBucket(limits.frames_per_s, limits.frames_burst)
        self._bytes = TokenBucket(limits.bytes_per_s, limits.bytes_burst)
        self._synced = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._waiters: dict[int, asyncio.Future] = {}  # outbox seq -> sender waiting for the ack
        self._written_seq = 0  # the highest outbox seq written to the guest (it may have it)
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None
        self._deliverer: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the outbox delivery (needs a running loop); attach() adds a channel."""
        if self._deliverer is None:
            self._deliverer = self._spawn(self._deliver_loop(), "deliver")

    def attach(self, channel: Channel, source: str | None = None) -> None:
        """Talk to the guest over ``channel`` (the session must have none)."""
        if self._main is not None:
            raise errors.BridgeError("VM %r already has a channel" % self.name)
        self.channel = channel
        self.channel_spec = channel.spec
        self.source = source or self.source
        self.store.vm(self.name, channel.spec, self.source)
        self._main = asyncio.get_running_loop().create_task(self._run(), name="vm:" + self.name)

    async def detach(self) -> None:
        """Drop the channel (the VM stopped); outbox and mirror stay."""
        main, self._main = self._main, None
        if main is not None:
            main.cancel()
            await asyncio.gather(main, return_exceptions=True)
        if self.channel is not None:
            await self.channel.aclose()
        self._on_link_down()

    async def stop(self) -> None:
        self._stopping = True
        await self.detach()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flush()

    def _spawn(self, coro, what: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name="vm:%s:%s" % (self.name, what))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("%s failed: %r", task.get_name(), task.exception())

    # -- the one reader ---------------------------------------------------------------------------

    async def _run(self) -> None:
        channel = self.channel
        while not self._stopping:
            self._set_state(State.CONNECTING)
            try:
                await channel.connect()
            except ChannelClosed:
                return
            if channel.connects > 1:
                self.counters["reconnects"] += 1
            self.log.debug("link up on %s", channel.spec)
            reader = Reader()
            self._hello_interval = self.limits.hello_interval
            try:
                self._start_handshake("connected")
                while True:
                    data = await channel.read()
                    self._on_data(reader, data)
                    delay = self._bytes.take(len(data))
                    # Yield even when more input is ready: one busy guest must not starve others.
                    await asyncio.sleep(0)
                    delay = max(delay, self._frames_delay)
                    if delay > 0:
                        self.warn.warn(
                            "rate",
                            "guest sends faster than %.0f frames/s or %.0f "
                            "bytes/s; reading it is slowed down",
                            self.limits.frames_per_s,
                            self.limits.bytes_per_s,
                        )
                        await asyncio.sleep(min(delay, 5.0))
            except (ChannelClosed, ChannelFull) as e:
                self.log.info("link lost: %s", e.message)
            finally:
                channel.disconnect()
                self._on_link_down()

    def _on_data(self, reader: Reader, data: bytes) -> None:
        self.last_seen = time.time()
        self._last_frame = time.monotonic()
        events = reader.feed(data)
        self._frames_delay = self._frames.take(len(events)) if events else 0.0
        if self._frames_delay > 0:
            self.counters["dropped_rate_limited"] += len(events)
        for ev in events:
            if isinstance(ev, Resync):
                continue
            self.counters["frames_in"] += 1
            if isinstance(ev, ProtocolError):
                self._on_bad_frame(ev)
            elif self.state is State.SYNCING:
                self._on_syncing_frame(ev)
            elif self.state is State.SYNCED:
                self._on_frame(ev)

    _frames_delay = 0.0

    def _on_bad_frame(self, err: ProtocolError) -> None:
        self.counters["bad_frames"] += 1
        self.warn.warn("bad_frame", "bad frame from the guest (%s): %s", err.code, err.message)
        rid = getattr(err, "request_id", None)
        pending = self._pending.get(rid) if rid is not None else None
        if pending is not None and not pending.fut.done():
            pending.fut.set_exception(
                errors.BridgeError("the guest sent a malformed reply: %s" % err.message, err.code)
            )

    def _on_syncing_frame(self, msg) -> None:
        hs = self._handshake
        if hs is None:
            return
        try:
            result = hs.accept(msg)
        except RemoteError as e:
            self.warn.warn("hello", "the guest refused our hello: %s", e.message)
            return
        if result is not None:
            self._on_synced(result)

    def _on_frame(self, msg) -> None:
        t = type(msg)
        if t is Ok or t is Err:
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending is None:
                self.log.debug("reply to unknown request id %s dropped", msg.id)
                return
            if pending.fut.done():
                return
            if t is Ok:
                pending.fut.set_result((msg, pending.items))
            else:
                exc_cls = errors.NotFound if msg.code == "not_found" else GuestError
                pending.fut.set_exception(exc_cls("guest: %s" % msg.msg[:200], msg.code))
        elif t is Item:
            pending = self._pending.get(msg.id)
            if pending is None or pending.items is None or pending.fut.done():
                return
            pending.item_bytes += len(msg.key) + len(msg.value)
            if (
                len(pending.items) >= self.limits.mirror_keys
                or pending.item_bytes > self.limits.mirror_bytes
            ):
                pending.fut.set_exception(
                    errors.BridgeError(
                        "the guest's answer passed %d keys or %d bytes"
                        % (self.limits.mirror_keys, self.limits.mirror_bytes)
                    )
                )
                pending.items = None
                return
            pending.items.append(msg)
        elif t is Changed:
            self._on_changed(msg)
        elif t is Ping:
            self._write(encode(Ok(id=msg.id)))
        elif t.TYPE in REQUEST_TYPES:
            self._write(
                encode(
                    Err(
                        id=msg.id,
                        code="bad_request",
                        msg="the host does not accept %r requests" % t.TYPE,
                    )
                )
            )

    # -- handshake --------------------------------------------------------------------------------

    def _start_handshake(self, why: str) -> None:
        if self.state is State.SYNCED:
            self.counters["resyncs"] += 1
        self._set_state(State.SYNCING)
        self._fail_pending(
            LinkReset("the link to VM %r is resynchronizing (%s)" % (self.name, why))
        )
        self._handshake = Handshake(
            request_id=next(self._ids), nonce=os.urandom(8).hex(), epoch=self.epoch
        )
        self.log.debug("hello (%s)", why)
        try:
            self._write(self._handshake.opening())
        except ChannelFull:
            pass  # the retry will try again; stale hellos are useless anyway
        loop = asyncio.get_running_loop()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._hello_timer = loop.call_later(self._hello_interval, self._hello_retry)
        self._hello_interval = min(self._hello_interval * 2, self.limits.hello_interval_max)

    def _hello_retry(self) -> None:
        self._hello_timer = None
        if self.state is State.SYNCING and self.channel is not None and self.channel.connected:
            try:
                self._start_handshake("no answer to hello")
            except ChannelClosed:
                pass

    def _on_synced(self, result) -> None:
        self._handshake = None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._hello_interval = self.limits.hello_interval
        self.agent_version = result.agent or None
        self.connected_since = time.time()
        self._guest_gid = result.gid
        self._seen_gseq = result.gseq
        self._set_state(State.SYNCED)
        self.log.info("synced with %s (gseq %d, hseq %d)", result.agent, result.gseq, result.hseq)
        # Everything up to hseq in our epoch was applied by the guest, acknowledged or not.
        hseq = result.hseq if result.epoch == self.epoch else 0
        done = [r for r in self.store.outbox(self.name, limit=1 << 30) if r.seq <= hseq]
        if done:
            self._delivered(done)
        self._written_seq = hseq
        self._outbox_wake.set()
        if self.mirror.gid != result.gid or self.mirror.gseq != result.gseq:
            self._refresh()
        self._schedule_keepalive()

    # -- requests ---------------------------------------------------------------------------------

    def _guard(self) -> None:
        if self.state is not State.SYNCED:
            raise errors.AgentNotConnected(
                "the agent in VM %r is not connected (link %s)" % (self.name, self.state.value)
            )

    async def request(self, make, timeout: float, collect: bool = False, internal: bool = False):
        """Send the request ``make(id)`` and wait for its reply: (Ok, items or None).

        Raises AgentNotConnected (not synced), Busy (too many outstanding), AgentTimeout (and the
        session resynchronizes), LinkReset, NotFound or GuestError (the guest's `err`).
        """
        self._guard()
        if not internal and len(self._pending) >= self.limits.max_outstanding:
            raise errors.Busy(
                "VM %r has %d requests outstanding, the limit" % (self.name, len(self._pending))
            )
        rid = next(self._ids)
        msg = make(rid)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(fut, collect)
        try:
            self._write(encode(msg))
            return await asyncio.wait_for(fut, timeout)
        except ChannelFull as e:
            raise errors.Busy(e.message) from None
        except ChannelClosed as e:
            raise errors.AgentNotConnected(e.message) from None
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            self.warn.warn(
                "timeout", "no answer to %r within %.1f s; resynchronizing", msg.TYPE, timeout
            )
            if self.state is State.SYNCED and self.channel is not None and self.channel.connected:
                self._start_handshake("request timed out")
            raise errors.AgentTimeout(
                "the agent in VM %r did not answer within %.1f s" % (self.name, timeout)
            ) from None
        finally:
            self._pending.pop(rid, None)

    def _write(self, data: bytes) -> None:
        if self.channel is None:
            raise ChannelClosed("VM %r has no channel" % self.name)
        self.channel.write(data)
        self.counters["frames_out"] += 1

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(exc)

    @property
    def outstanding(self) -> int:
        return len(self._pending) + len(self._waiters)

    # -- keepalive: on a unix channel only silence tells us the agent went away -----------------------

    def _schedule_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        if self.limits.keepalive > 0:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                self.limits.keepalive / 2, self._keepalive
            )

    def _keepalive(self) -> None:
        self._keepalive_timer = None
        if self.state is not State.SYNCED:
            return
        if time.monotonic() - self._last_frame >= self.limits.keepalive:
            self._spawn(self._ping(), "keepalive")
        self._schedule_keepalive()

    async def _ping(self) -> None:
        try:
            await self.request(lambda i: Ping(id=i), min(5.0, self.limits.keepalive), internal=True)
        except errors.BridgeError as e:
            self.log.debug("keepalive: %s", e.message)

    # -- the mirror -------------------------------------------------------------------------------

    def _on_changed(self, msg: Changed) -> None:
        self._seen_gseq = max(self._seen_gseq or 0, msg.gseq)
        if self._refreshing:
            # The listing under way may or may not include this change, and its reply may be
            # processed after this frame: hold the change and replay it onto the listing if it is
            # newer than what the listing reflects (applying it now would be wiped by replace()).
            if len(self._held_changes) < HELD_CHANGES_MAX:
                self._held_changes.append(msg)
            else:
                self._held_overflow = True
            return
        self._apply_change(msg)

    def _apply_change(self, msg: Changed) -> bool:
        """Apply one change; False when it shows a gap (a refresh is then under way)."""
        known = self.mirror.gid == self._guest_gid and self.mirror.gseq is not None
        expected = (self.mirror.gseq or 0) + 1
        if known and msg.gseq < expected:
            return True  # already mirrored
        if not self.mirror.apply(msg.op, msg.key, msg.value, float(msg.ts), msg.origin):
            self.warn.warn(
                "quota",
                "mirror quota reached (%d keys, %d bytes); key %r not mirrored",
                self.limits.mirror_keys,
                self.limits.mirror_bytes,
                msg.key,
            )
        if known and msg.gseq == expected:
            self.mirror.gseq = msg.gseq
            return True
        self.log.debug("gseq %d after %s: refreshing the mirror", msg.gseq, self.mirror.gseq)
        self._refresh()
        return False

    def _refresh(self) -> None:
        if not self._refreshing:
            self._refreshing = True
            self._held_changes = []
            self._held_overflow = False
            self._spawn(self._do_refresh(), "refresh")

    async def _do_refresh(self) -> None:
        try:
            ok, items = await self.request(
                lambda i: List(id=i), REFRESH_TIMEOUT, collect=True, internal=True
            )
        except errors.BridgeError as e:
            self._refreshing = False
            self.log.info("mirror refresh failed: %s", e.message)  # the next sync retries
            return
        # ok.gseq is the change counter the listing reflects (an agent too old to say: None).
        listed = ok.gseq
        self.mirror.replace(
            [(i.key, i.value, float(i.ts), i.origin) for i in items],
            self._guest_gid,
            listed if listed is not None else self._seen_gseq,
        )
        self.log.debug("mirror refreshed: %d keys", len(items))
        self._refreshing = False
        held, self._held_changes = self._held_changes, []
        if self._held_overflow or (held and listed is None):
            self._refresh()  # cannot tell which held changes the listing has: list again
        else:
            for msg in held:
                if msg.gseq > listed and not self._apply_change(msg):
                    break
        self.flush()

    def flush(self) -> None:
        """Persist mirror changes and last_seen (called every second or so by the bridge)."""
        if not self.mirror.dirty and self.last_seen == getattr(self, "_flushed_seen", None):
            return
        rows, deleted, unhidden, replace = self.mirror.take_dirty()
        self.store.save_mirror(
            self.name,
            [MirrorRow(k, e.value, e.ts, e.origin, e.hidden) for k, e in rows],
            deleted,
            replace,
            self.last_seen,
            self.mirror.gid,
            self.mirror.gseq,
            unhidden,
        )
        self._flushed_seen = self.last_seen

    # -- the outbox -------------------------------------------------------------------------------

    def wake_outbox(self) -> None:
        self._outbox_wake.set()

    def wait_delivery(self, seq: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[seq] = fut
        return fut

    def forget_waiter(self, seq: int) -> None:
        self._waiters.pop(seq, None)

    def was_written(self, seq: int) -> bool:
        """Whether the guest may have received outbox message ``seq``."""
        return seq <= self._written_seq

    async def _deliver_loop(self) -> None:
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            while self.state is State.SYNCED:
                rows = self.store.outbox(self.name, limit=1)
                if not rows:
                    break
                if not await self._deliver(rows[0]):
                    break

    async def _deliver(self, row) -> bool:
        """Send one outbox message and wait for its ack; False when the link failed."""
        if row.value is None:

            def make(i, row=row):
                return Delete(id=i, key=row.key, seq=row.seq)
        else:

            def make(i, row=row):
                return Set(id=i, key=row.key, value=row.value, seq=row.seq)

        self._written_seq = max(self._written_seq, row.seq)
        try:
            await self.request(make, self.limits.delivery_timeout, internal=True)
        except GuestError as e:
            if e.code == "busy":
                # Transient, never a refusal: an agent restarted behind QEMU's socket (which tells
                # the host nothing) answers "busy, send hello first". Resync, then deliver again.
                self.log.info("delivery of %d deferred (%s); resynchronizing", row.seq, e.message)
                channel = self.channel
                if self.state is State.SYNCED and channel is not None and channel.connected:
                    self._start_handshake("the guest answered busy")
                return False
            self.warn.warn(
                "refused", "the guest refused message %d (key %r): %s", row.seq, row.key, e.message
            )
            self.store.finish(self.name, [row.seq], "failed")
            self._after_delivery([row.seq], e)
            return True
        except errors.NotFound as e:  # not an answer to set/del; treat as a refusal
            self.store.finish(self.name, [row.seq], "failed")
            self._after_delivery([row.seq], GuestError(e.message, e.code))
            return True
        except errors.BridgeError as e:
            self.log.debug("delivery of %d interrupted: %s", row.seq, e.message)
            return False
        self._delivered([row])
        return True

    def _delivered(self, rows) -> None:
        for row in rows:
            if (
                row.value is not None
                and row.log
                and not self.store.secret_pending(self.name, row.key, row.seq)
            ):
                self.mirror.unhide(row.key)  # the guest now holds a value we may keep on disk
        seqs = [row.seq for row in rows]
        self.store.finish(self.name, seqs, "delivered")
        self._after_delivery(seqs)

    def _after_delivery(self, seqs, exc: Exception | None = None) -> None:
        for seq in seqs:
            fut = self._waiters.pop(seq, None)
            if fut is not None and not fut.done():
                if exc is None:
                    fut.set_result(seq)
                else:
                    fut.set_exception(exc)

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(LinkReset("the agent in VM %r disconnected" % self.name))

    # -- state ----------------------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        self.log.debug("%s -> %s", self.state.value, state.value)
        self.state = state
        if state is State.SYNCED:
            self._synced.set()
        else:
            self._synced.clear()

    def _on_link_down(self) -> None:
        self._cancel_timers()
        self._handshake = None
        self._set_state(State.DISCONNECTED)
        self.connected_since = None
        self._fail_pending(LinkReset("the link to VM %r was lost" % self.name))
        self._fail_waiters()

    def _cancel_timers(self) -> None:
        for attr in ("_hello_timer", "_keepalive_timer"):
            timer = getattr(self, attr)
            if timer is not None:
                timer.cancel()
                setattr(self, attr, None)

    async def wait_synced(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
