"""The bridge's change stream: what happened, in order, for every consumer, in bounded memory.

    hub = EventHub()
    hub.publish("key.set", vm="web1", key="k", origin="guest", set_time=ts, value="v")
    batch = hub.after(since, vm="web1")        # the events after id `since` (and what was missed)
    await hub.wait_after(batch.last, 15.0)     # until something newer exists, or the timeout

One ring of recent events serves every consumer: a consumer is only a cursor (the id of the last
event it took), so a hundred slow or stuck consumers cost what one does, and the ring is bounded in
events and in bytes. A consumer that falls behind the ring's oldest event is told how many it
missed (an ``overflow`` event) and goes on from the oldest still kept: it re-reads what it shows,
as after a reconnect. Publishing never blocks and never fails, whatever the consumers do.

Ids increase and start at the bridge's start time in microseconds, so ids from an earlier run of
the bridge are all below this run's: a consumer resuming across a restart is told it missed events
(``missed`` null: how many is unknown) instead of silently skipping this run's first ones.

Events never carry a value the bridge keeps off disk (a log=no message): ``hidden`` says one
exists. The JSON of an event is made on first use and kept, so a bridge nobody watches does not
pay for it. Event types and fields: docs/api.md, "The change stream".
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ovmproto import jsonlib

MAX_EVENTS = 4096
MAX_BYTES = 4 << 20  # about 500 events that carry an 8 KiB value, 40,000 small ones
_OVERHEAD = 160  # what an event's JSON holds besides its key and value, roughly

EVENT_TYPES = (
    "vm.added",
    "vm.state",
    "vm.placed",
    "agent.state",
    "key.set",
    "key.deleted",
    "keys.cleared",
    "keys.refreshed",
    "message.queued",
    "message.delivered",
    "message.failed",
    "message.refused",
    "message.cancelled",
    "message.expired",
)


class Event:
    """One event: ``fields`` is its JSON object (id, time, type, vm first)."""

    __slots__ = ("id", "vm", "type", "fields", "size", "_json")

    def __init__(self, id: int, type: str, vm: str | None, fields: dict[str, Any]) -> None:
        self.id = id
        self.type = type
        self.vm = vm
        self.fields = fields
        key, value = fields.get("key"), fields.get("value")
        self.size = (
            _OVERHEAD
            + (len(key) if isinstance(key, str) else 0)
            + (len(value) * 2 if isinstance(value, str) else 0)  # escapes may double it
        )
        self._json: bytes | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = jsonlib.dumps(self.fields)
        return self._json

    def sse(self) -> bytes:
        """The event as one Server-Sent Events block (the JSON holds no newline)."""
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.type.encode(), self.json)


@dataclass
class Batch:
    """What after() found: ``events`` (matching the filter), ``last`` (the id to resume after:
    the last event looked at, matching or not) and ``missed`` (events dropped from the ring before
    this consumer took them; None when unknown, 0 when none)."""

    events: list[Event]
    last: int
    missed: int | None = 0

    def overflow(self) -> Event | None:
        """The ``overflow`` event to give the consumer first, when it missed any."""
        if self.missed == 0:
            return None
        return Event(0, "overflow", None, {"type": "overflow", "missed": self.missed})

    def to_send(self) -> list[Event]:
        """What the consumer is given, in order: the overflow event when it missed any, then
        the events."""
        first = self.overflow()
        return self.events if first is None else [first, *self.events]


class EventHub:
    def __init__(self, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._ring: deque[Event] = deque()
        self._bytes = 0
        self.first_id = int(time.time() * 1_000_000)
        self._next_id = self.first_id
        self._wakeup: asyncio.Future[None] | None = None
        self.closed = False
        self.consumers = 0  # streams and long polls waiting now (the API bounds them)
        self.published = 0
        # Called with each event as it is published, in the publisher's call (the metrics count
        # outcomes this way): they must be quick and must not raise.
        self.listeners: list[Callable[[Event], None]] = []
        self.dropped = 0  # events pushed out of the ring by newer ones

    @property
    def last_id(self) -> int:
        """The newest event's id (first_id - 1 before any): resume after it to see only new ones."""
        return self._next_id - 1

    def publish(self, type: str, vm: str | None = None, **fields: Any) -> None:
        """Record an event and wake every waiting consumer. Never blocks, never raises for a
        consumer's sake; callers pass JSON-ready fields and never a hidden value."""
        ev = Event(
            self._next_id,
            type,
            vm,
            {"id": self._next_id, "time": time.time(), "type": type, "vm": vm, **fields},
        )
        self._next_id += 1
        self.published += 1
        ring = self._ring
        ring.append(ev)
        self._bytes += ev.size
        while len(ring) > self.max_events or (self._bytes > self.max_bytes and len(ring) > 1):
            self._bytes -= ring.popleft().size
            self.dropped += 1
        for listener in self.listeners:
            listener(ev)
        w = self._wakeup
        if w is not None:
            self._wakeup = None
            if not w.done():
                w.set_result(None)

    def after(self, since: int, vm: str | None = None, limit: int = MAX_EVENTS) -> Batch:
        """The events after id ``since`` (of VM ``vm`` only, when given), at most ``limit``."""
        ring = self._ring
        oldest = ring[0].id if ring else self._next_id
        missed: int | None = 0
        if since < self.first_id - 1:
            missed = None  # an id from an earlier run of the bridge: how many is unknown
            since = oldest - 1
        elif since < oldest - 1:
            missed = oldest - 1 - since
            since = oldest - 1
        since = min(since, self.last_id)  # an id from the future: resume after the newest
        if since >= self.last_id:
            return Batch([], since, missed)
        # Ids are consecutive in the ring: the first event after `since` is at a known place.
        start = since + 1 - oldest
        out: list[Event] = []
        last = since
        for i in range(start, len(ring)):
            ev = ring[i]
            last = ev.id
            if vm is None or ev.vm == vm:
                out.append(ev)
                if len(out) >= limit:
                    break
        return Batch(out, last, missed)

    async def wait_after(self, since: int, timeout: float) -> bool:
        """Wait until an event newer than ``since`` exists (True), the timeout passes or the hub
        closes (False)."""
        if self._next_id - 1 > since:
            return True
        if self.closed:
            return False
        w = self._wakeup
        if w is None:
            w = self._wakeup = asyncio.get_running_loop().create_future()
        try:
            # shield: one waiter's timeout must not cancel the future the others wait on.
            await asyncio.wait_for(asyncio.shield(w), timeout)
        except asyncio.TimeoutError:
            return False
        return self._next_id - 1 > since

    def close(self) -> None:
        """Wake every consumer for good (the bridge stops): their streams end."""
        self.closed = True
        w = self._wakeup
        self._wakeup = None
        if w is not None and not w.done():
            w.set_result(None)

    def stats(self) -> dict[str, int]:
        return {
            "events": len(self._ring),
            "event_bytes": self._bytes,
            "events_published": self.published,
            "events_dropped": self.dropped,
            "event_consumers": self.consumers,
        }
