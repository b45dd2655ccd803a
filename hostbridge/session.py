"""One guest's link: the channel, the protocol on it, its state and its requests.

States (``Session.state``; docs/bridge.md has the table the API shows):

    DISCONNECTED  no link, and not trying
    CONNECTING    establishing the link (unix: connect() with backoff; pty: waiting for a guest
                  program to open it)
    SYNCING       link up, a hello out (hostbridge.hello); every frame is ignored until the
                  reply that echoes its nonce
    SYNCED        the stream is trusted: requests, `changed` frames

A request timeout sends the session back to SYNCING: after a timeout the stream is not trusted
until it has been resynchronized, and every request still waiting fails.

One reader task per session reads the channel, pays the rate limit (hostbridge.throttle) and
dispatches: replies to the id->future map, the rest to its owner.

Between links the session waits: a link that ended before it was stable (synced, then up
STABLE_LINK seconds) grows a backoff that outlives the link, and a budget caps connects per minute
(hostbridge.backoff). A guest that accepts each connection and closes it costs a few connects a
minute, not thousands a second.

What a guest announces (`changed`, `item`) passes admit(): a key or value that host input could
not carry (a control character, '=', over its size) is refused, counted and logged escaped, never
stored; the operator could not even name such a key to remove it.

The session knows nothing of the outbox, the mirror or the database. Its owner (hostbridge.guest)
wires three callbacks: on_synced(HelloResult), on_changed(Changed) and on_link_down().
Never log a value: keys and sizes only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from ovmproto.codec import Reader, encode
from ovmproto.errors import ProtocolError
from ovmproto.framing import Resync
from ovmproto.handshake import HelloResult
from ovmproto.limits import check_key, check_value
from ovmproto.messages import REQUEST_TYPES, Changed, Err, Item, Ok, Ping
from ovmsys.ratelimit import RateLimitedLog

from . import errors
from .backoff import STABLE_LINK, Backoff, ReconnectBudget
from .channels import RECONNECT_FIRST, Channel, ChannelClosed, ChannelFull
from .config import Limits
from .errors import LinkReset
from .hello import Greeter
from .model import zero_counters
from .replies import Pending, Reply
from .throttle import Throttle

log = logging.getLogger(__name__)


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    SYNCING = "syncing"
    SYNCED = "synced"

    @property
    def agent(self) -> str:
        """VmInfo.agent: connected (synced) | connecting (link up, no answer yet) | disconnected."""
        return {"synced": "connected", "syncing": "connecting"}.get(self.value, "disconnected")


def _nothing(*_: Any) -> None:
    pass


class Session:
    def __init__(self, name: str, limits: Limits, epoch: str | None = None) -> None:
        self.name = name
        self.limits = limits
        self.log = log.getChild(name.replace(".", "_"))
        self.warn = RateLimitedLog(self.log)
        self.channel: Channel | None = None  # attach() gives it one
        self.state = State.DISCONNECTED
        self.agent_version: str | None = None
        self.connected_since: float | None = None
        self.last_seen: float | None = None  # wall time of the last bytes from the guest
        self.last_frame = 0.0  # monotonic time of the same, for the keepalive
        self.counters = zero_counters()
        # True from the guest's ok to a host set or del that changed its cache until the next
        # frame, which is then the `changed` announcing it (see _on_frame): meanwhile a sender
        # already told "delivered" would not find the change in the mirror.
        self.change_due = False
        # The owner's callbacks.
        self.on_synced: Callable[[HelloResult], None] = _nothing
        self.on_changed: Callable[[Changed], None] = _nothing
        self.on_link_down: Callable[[], None] = _nothing
        self.on_state: Callable[[State], None] = _nothing  # after each change of state
        self._ids = itertools.count(1)  # never reused, so a late reply never matches a new request
        self._pending: dict[int, Pending] = {}
        self._greeter = Greeter(self._send_hello, self._ids.__next__, limits, self.log, self.warn)
        self._greeter.epoch = epoch
        self._throttle = Throttle(limits, self.warn)
        self._main: asyncio.Task[None] | None = None
        self._backoff = Backoff(RECONNECT_FIRST, limits.reconnect_max)
        self._budget = ReconnectBudget(limits.reconnect_budget)
        self._next_wait = 0.0  # seconds to wait before the next connect (set as a link ends)
        self._synced_at: float | None = None  # monotonic time the current link synced
        # Cleared while the VM migrates away (hold_connects): the link the switch-over ends is not
        # connected again, as the socket going away would take the connect and reset it.
        self._may_connect = asyncio.Event()
        self._may_connect.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, channel: Channel) -> None:
        """Talk to the guest over ``channel`` (the session must have none)."""
        if self._main is not None:
            raise errors.BridgeError("VM %r already has a channel" % self.name)
        self.channel = channel
        self._main = asyncio.get_running_loop().create_task(self._run(), name="vm:" + self.name)

    async def detach(self) -> None:
        """Drop the channel for good (the VM stopped)."""
        main, self._main = self._main, None
        if main is not None:
            main.cancel()
            await asyncio.gather(main, return_exceptions=True)
        if self.channel is not None:
            await self.channel.aclose()
        self._link_down()

    def hold_connects(self) -> None:
        """Do not connect again once the current link ends, until allow_connects(): the VM is
        migrating away, and its channel's socket here ends with the migration."""
        self._may_connect.clear()

    def allow_connects(self) -> None:
        """Connect again as usual (the VM stays here: claimed, or its migration failed)."""
        self._may_connect.set()

    @property
    def connects_held(self) -> bool:
        return not self._may_connect.is_set()

    # -- the one reader -------------------------------------------------------------------------

    async def _run(self) -> None:
        channel = self.channel
        assert channel is not None
        while True:
            self._set_state(State.CONNECTING)
            await self._may_connect.wait()
            await asyncio.sleep(self._wait_before_connect())
            try:
                await channel.connect()
            except ChannelClosed:
                return
            self._budget.spend()
            if channel.connects > 1:
                self.counters["reconnects"] += 1
            self.log.debug("link up on %s", channel.spec)
            reader = Reader()
            try:
                self.resync("connected")
                while True:
                    data = await channel.read()
                    self._on_data(reader, data)
                    # Yield even when more input is ready: one busy guest must not starve others.
                    await asyncio.sleep(self._throttle.pause(len(data)))
            except (ChannelClosed, ChannelFull) as e:
                self.log.info("link lost: %s", e.message)
            finally:
                channel.disconnect()
                self._link_down()
            self._after_link()  # not when cancelled: the bridge stopping is not a failed link

    def _after_link(self) -> None:
        """A link ended: a stable one resets the backoff, any other makes the next connect wait."""
        synced_at, self._synced_at = self._synced_at, None
        if self.connects_held:
            # The VM is migrating away: its link ends with it, as it should; no connect follows.
            return
        if synced_at is not None and time.monotonic() - synced_at >= STABLE_LINK:
            self._backoff.reset()
            self._next_wait = 0.0
            return
        self.counters["failed_links"] += 1
        self._next_wait = self._backoff.delay()
        self.warn.warn(
            "failed_link",
            "the link ended before it was stable (%d so far); next connect in %.2f s or more",
            self.counters["failed_links"],
            self._next_wait,
        )

    def _wait_before_connect(self) -> float:
        wait, self._next_wait = self._next_wait, 0.0
        over_budget = self._budget.wait()
        if over_budget > wait:
            self.counters["reconnects_delayed"] += 1
            self.warn.warn(
                "reconnect_budget",
                "%d connects within a minute, the budget; next connect in %.1f s",
                self._budget.per_minute,
                over_budget,
            )
            return over_budget
        return wait

    def _on_data(self, reader: Reader, data: bytes) -> None:
        self.last_seen = time.time()
        self.last_frame = time.monotonic()
        events = reader.feed(data)
        if self._throttle.frames(len(events)):
            self.counters["dropped_rate_limited"] += len(events)
        for ev in events:
            if isinstance(ev, Resync):
                continue
            self.counters["frames_in"] += 1
            if isinstance(ev, ProtocolError):
                self._on_bad_frame(ev)
            elif self.state is State.SYNCING:
                result = self._greeter.accept(ev)
                if result is not None:
                    self._on_hello_answered(result)
            elif self.state is State.SYNCED:
                self._on_frame(ev)

    def _on_bad_frame(self, err: ProtocolError) -> None:
        self.counters["bad_frames"] += 1
        self.warn.warn("bad_frame", "bad frame from the guest (%s): %s", err.code, err.message)
        rid = getattr(err, "request_id", None)  # a BadMessage with a usable id: a bad reply
        pending = self._pending.get(rid) if rid is not None else None
        if pending is not None:
            # The bridge's failure, not the user's: never pass on the guest's code (bad_request
            # would make vmmessage report a usage error).
            pending.fail(errors.BridgeError("the guest sent a malformed reply: %s" % err.message))

    def _on_frame(self, msg: Any) -> None:
        t = type(msg)
        # The agent writes the `changed` a host set or del caused right after its ok, before any
        # other frame (guestagent.hostlink holds it until then); a duplicate, a del of a missing
        # key or a set of the event key change nothing and announce nothing, so the next frame
        # clears this all the same.
        self.change_due = t is Ok and msg.seq is not None and not msg.dup and msg.found is not False
        if t is Ok or t is Err:
            pending = self._pending.get(msg.id)
            if pending is None:
                self.log.debug("reply to unknown request id %s dropped", msg.id)
            else:
                pending.reply(msg)
        elif t is Item:
            pending = self._pending.get(msg.id)
            if pending is not None and self.admit(msg.key, msg.value):
                pending.item(msg, self.limits.mirror_keys, self.limits.mirror_bytes)
        elif t is Changed:
            self.on_changed(msg)
        elif t is Ping:
            self._write(encode(Ok(id=msg.id)))
        elif t.TYPE in REQUEST_TYPES:
            reason = "the host does not accept %r requests" % t.TYPE
            self._write(encode(Err(id=msg.id, code="bad_request", msg=reason)))

    def admit(self, key: str | None, value: str | None) -> bool:
        """Whether a key (and value) the guest announced may be kept: the rules of host input.

        A refusal is counted in refused_keys and logged (rate-limited, the key escaped and cut,
        never the value)."""
        problem = check_key(key) if key is not None else None
        if problem is None and value is not None:
            problem = check_value(value)
        if problem is None:
            return True
        self.counters["refused_keys"] += 1
        shown = repr(key[:64]) + ("..." if len(key) > 64 else "") if key is not None else "-"
        self.warn.warn(
            "refused_key", "the guest announced key %s, refused (%s): %s", shown, *problem
        )
        return False

    # -- synchronization ------------------------------------------------------------------------

    def resync(self, why: str) -> None:
        """Stop trusting the stream until a new hello is answered; fail what is waiting.

        Also for the session's users: a guest that answers "busy" lost our hello (an agent that
        restarted behind QEMU's socket, which tells the host nothing).
        """
        channel = self.channel
        if channel is None or not channel.connected:
            return
        if self.state is State.SYNCED:
            self.counters["resyncs"] += 1
        self._set_state(State.SYNCING)
        self._fail_pending(
            LinkReset("the link to VM %r is resynchronizing (%s)" % (self.name, why))
        )
        self._greeter.begin(why)

    def _send_hello(self, data: bytes) -> None:
        try:
            self._write(data)
        except (ChannelFull, ChannelClosed):
            pass  # the greeter tries again; a stale hello is useless anyway

    def _on_hello_answered(self, result: HelloResult) -> None:
        self.agent_version = result.agent or None
        self.connected_since = time.time()
        self._synced_at = time.monotonic()
        self.change_due = False  # what the last link owed, the hello's gseq accounts for
        self._set_state(State.SYNCED)
        self.log.info("synced with %s (gseq %d, hseq %d)", result.agent, result.gseq, result.hseq)
        self.on_synced(result)

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self,
        make: Callable[[int], Any],
        timeout: float,
        collect: bool = False,
        internal: bool = False,
    ) -> Reply:
        """Send the request ``make(id)`` and wait for its reply: (Ok, items or None).

        Raises AgentNotConnected (not synced), Busy (too many outstanding), AgentTimeout (and the
        session resynchronizes), LinkReset, NotFound or GuestError (the guest's `err`).
        """
        if self.state is not State.SYNCED:
            raise errors.AgentNotConnected(
                "the agent in VM %r is not connected (link %s)" % (self.name, self.state.value)
            )
        if not internal and len(self._pending) >= self.limits.max_outstanding:
            raise errors.Busy(
                "VM %r has %d requests outstanding, the limit" % (self.name, len(self._pending))
            )
        rid = next(self._ids)
        msg = make(rid)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = Pending(fut, collect)
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
            if self.state is State.SYNCED:
                self.resync("request timed out")
            raise errors.AgentTimeout(
                "the agent in VM %r did not answer within %.1f s" % (self.name, timeout)
            ) from None
        finally:
            self._pending.pop(rid, None)

    @property
    def outstanding(self) -> int:
        """Requests waiting for their reply."""
        return len(self._pending)

    def _write(self, data: bytes) -> None:
        if self.channel is None:
            raise ChannelClosed("VM %r has no channel" % self.name)
        self.channel.write(data)
        self.counters["frames_out"] += 1

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(exc)

    # -- state ----------------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        self.log.debug("%s -> %s", self.state.value, state.value)
        self.state = state
        self.on_state(state)

    def _link_down(self) -> None:
        self._greeter.stop()
        self._set_state(State.DISCONNECTED)
        self.connected_since = None
        self._fail_pending(LinkReset("the link to VM %r was lost" % self.name))
        self.on_link_down()
