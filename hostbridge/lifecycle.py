"""Each libvirt domain's run state, followed live from libvirt's domain lifecycle events.

    def changed(ev: LifecycleEvent) -> None: ...      # called in the caller's event loop
    lc = Lifecycle("qemu:///system", changed)
    await lc.start()          # connects (or keeps trying), lists every domain, follows events
    lc.state("web1")          # RunState(state="running", reason="STARTED_BOOTED", since=...)
    await lc.stop()

States (RUN_STATES): "running", "paused", "shutoff", "crashed", "migrating", "unknown". "unknown" is
never a guess: it is what every domain is while libvirt cannot be asked (libvirt-python missing,
libvirtd unreachable or gone) and what a name that is no libvirt domain is (a VM given as
``--vm NAME=unix:PATH``). The mapping from libvirt's codes is pure: event_state() for a lifecycle
event (event, detail), listed_state() for virDomainGetState's (state, reason); both keep libvirt's
raw names ("SUSPENDED_MIGRATED", "RESUMED_MIGRATED", "STOPPED_MIGRATED", "PAUSED_MIGRATION") as
the reason, which a pool of hosts needs to follow a live migration.

``on_event`` receives a LifecycleEvent for every lifecycle event of every domain, for every domain
listed at a (re)connect (event "LISTED"), and for every domain that becomes "unknown" when the
connection is lost (event "DISCONNECTED"); ``changed`` says whether the run state changed (a
domain that starts is resumed and started: two events, one change; DEFINED or SHUTDOWN_GUEST
change nothing). The RunState's reason is the latest event's detail. It runs in the event
loop that called start(); an exception in it is logged and does not stop the follower.

Connection: read-only. When libvirtd goes away (the close callback, or a failed keepalive) every
state becomes "unknown" and the follower reconnects with backoff (hostbridge.backoff), listing
every domain again. Failures are logged once, then at most every LOG_INTERVAL seconds.

Threads and event loops: libvirt takes one event implementation per process, the first one
registered, for the life of the process (later registrations are ignored), and libvirtaio's
implementation is bound to one asyncio loop and is not thread-safe. A bridge's loop may end while
the process goes on (tests run several loops in one process), so the implementation is registered
once, on a private asyncio loop in a daemon thread ("libvirt-events") started at first use. Every
libvirt call of this module runs on that thread (so libvirtaio's handles and timers are only ever
touched there, and a slow libvirtd never blocks the bridge's loop), and every event is handed to
the caller's loop with call_soon_threadsafe, in the order libvirt dispatched it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .backoff import STABLE_LINK, Backoff

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
RUN_STATES = ("running", "paused", "shutoff", "crashed", "migrating", "unknown")
LOG_INTERVAL = 600.0  # seconds between two log lines about libvirt being unreachable
RECONNECT_FIRST = 0.5  # seconds before the first reconnect; doubles up to RECONNECT_MAX
RECONNECT_MAX = 30.0
FIRST_CONNECT_WAIT = 5.0  # start() waits this long for the first listing, then goes on
KEEPALIVE_INTERVAL = 5  # seconds; a libvirtd that stops answering is dropped after
KEEPALIVE_COUNT = 3  # this many unanswered keepalives

_T = TypeVar("_T")

# -- the pure mapping --------------------------------------------------------------------------

# libvirt's virDomainEventType and the details of each (virDomainEvent*DetailType), by code. The
# codes are libvirt's stable ABI; tests/hostbridge/test_lifecycle.py checks them against
# libvirt-python's constants. A state of None: the event does not change the run state.
EVENTS: dict[int, str] = {
    0: "DEFINED",
    1: "UNDEFINED",
    2: "STARTED",
    3: "SUSPENDED",
    4: "RESUMED",
    5: "STOPPED",
    6: "SHUTDOWN",
    7: "PMSUSPENDED",
    8: "CRASHED",
}
_D = tuple[str, "str | None"]
DETAILS: dict[int, dict[int, _D]] = {
    0: {0: ("ADDED", None), 1: ("UPDATED", None), 2: ("RENAMED", None), 3: ("FROM_SNAPSHOT", None)},
    1: {0: ("REMOVED", None), 1: ("RENAMED", None)},
    2: {
        0: ("BOOTED", "running"),
        1: ("MIGRATED", "migrating"),  # incoming: paused here until RESUMED_MIGRATED
        2: ("RESTORED", "running"),
        3: ("FROM_SNAPSHOT", "running"),
        4: ("WAKEUP", "running"),
    },
    3: {
        0: ("PAUSED", "paused"),
        1: ("MIGRATED", "migrating"),  # outgoing: paused for the end of a live migration
        2: ("IOERROR", "paused"),
        3: ("WATCHDOG", "paused"),
        4: ("RESTORED", "paused"),
        5: ("FROM_SNAPSHOT", "paused"),
        6: ("API_ERROR", "paused"),
        7: ("POSTCOPY", "migrating"),
        8: ("POSTCOPY_FAILED", "paused"),
    },
    4: {
        0: ("UNPAUSED", "running"),
        1: ("MIGRATED", "running"),  # the migration finished (here, the destination)
        2: ("FROM_SNAPSHOT", "running"),
        3: ("POSTCOPY", "migrating"),  # runs here while its memory still comes from the source
        4: ("POSTCOPY_FAILED", "running"),
    },
    5: {
        0: ("SHUTDOWN", "shutoff"),
        1: ("DESTROYED", "shutoff"),
        2: ("CRASHED", "crashed"),
        3: ("MIGRATED", "shutoff"),  # it left this host: runs on the destination now
        4: ("SAVED", "shutoff"),
        5: ("FAILED", "shutoff"),
        6: ("FROM_SNAPSHOT", "shutoff"),
    },
    # The guest shuts down: still running until STOPPED follows.
    6: {0: ("FINISHED", None), 1: ("GUEST", None), 2: ("HOST", None)},
    7: {0: ("MEMORY", "paused"), 1: ("DISK", "paused")},
    # CRASHLOADED: a crash kernel took over and the guest goes on (and reboots) by itself, without
    # another lifecycle event: "crashed" would stay wrong after it is up again.
    8: {0: ("PANICKED", "crashed"), 1: ("CRASHLOADED", None)},
}

# virDomainState and the reasons of each (virDomain<State>Reason), as virDomainGetState gives them.
STATES: dict[int, str] = {
    0: "NOSTATE",
    1: "RUNNING",
    2: "BLOCKED",
    3: "PAUSED",
    4: "SHUTDOWN",
    5: "SHUTOFF",
    6: "CRASHED",
    7: "PMSUSPENDED",
}
_STATE_RUN = {
    0: "unknown",
    1: "running",
    2: "running",  # blocked on a resource: it runs
    3: "paused",
    4: "running",  # shutting down: still running
    5: "shutoff",
    6: "crashed",
    7: "paused",
}
REASONS: dict[int, dict[int, str]] = {
    0: {0: "UNKNOWN"},
    1: {
        0: "UNKNOWN",
        1: "BOOTED",
        2: "MIGRATED",
        3: "RESTORED",
        4: "FROM_SNAPSHOT",
        5: "UNPAUSED",
        6: "MIGRATION_CANCELED",
        7: "SAVE_CANCELED",
        8: "WAKEUP",
        9: "CRASHED",
        10: "POSTCOPY",
        11: "POSTCOPY_FAILED",
    },
    2: {0: "UNKNOWN"},
    3: {
        0: "UNKNOWN",
        1: "USER",
        2: "MIGRATION",
        3: "SAVE",
        4: "DUMP",
        5: "IOERROR",
        6: "WATCHDOG",
        7: "FROM_SNAPSHOT",
        8: "SHUTTING_DOWN",
        9: "SNAPSHOT",
        10: "CRASHED",
        11: "STARTING_UP",
        12: "POSTCOPY",
        13: "POSTCOPY_FAILED",
    },
    4: {0: "UNKNOWN", 1: "USER"},
    5: {
        0: "UNKNOWN",
        1: "SHUTDOWN",
        2: "DESTROYED",
        3: "CRASHED",
        4: "MIGRATED",
        5: "SAVED",
        6: "FAILED",
        7: "FROM_SNAPSHOT",
        8: "DAEMON",
    },
    6: {0: "UNKNOWN", 1: "PANICKED"},
    7: {0: "UNKNOWN"},
}
# (state, reason) pairs whose run state is not their state's.
_REASON_RUN = {
    (1, 10): "migrating",  # running here in post-copy: its memory still comes from the source
    (3, 2): "migrating",  # paused for (the end of) a live migration, either side
    (3, 12): "migrating",
    (5, 3): "crashed",  # shut off because it crashed
}


def event_state(event: int, detail: int) -> tuple[str | None, str, str]:
    """A lifecycle event's (run state or None when it changes nothing, event name, detail name).

    The detail name is the event's name and the detail's, as libvirt's constant
    VIR_DOMAIN_EVENT_<detail name> spells it ("SUSPENDED_MIGRATED"). Codes a newer libvirt may add
    map to None, with names "EVENT_<n>" / "<event>_<n>"."""
    name = EVENTS.get(event, "EVENT_%d" % event)
    known = DETAILS.get(event, {}).get(detail)
    if known is None:
        return None, name, "%s_%d" % (name, detail)
    return known[1], name, "%s_%s" % (name, known[0])


def listed_state(state: int, reason: int) -> tuple[str, str]:
    """virDomainGetState's (state, reason) as (run state, reason name), the name as libvirt's
    constant VIR_DOMAIN_<name> spells it ("PAUSED_MIGRATION"); codes unknown here: "unknown"."""
    name = STATES.get(state, "STATE_%d" % state)
    why = REASONS.get(state, {}).get(reason, str(reason))
    return _REASON_RUN.get((state, reason), _STATE_RUN.get(state, "unknown")), "%s_%s" % (name, why)


# -- the records handed out --------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    """A domain's run state: one of RUN_STATES, the raw libvirt name it comes from (None when
    "unknown" for want of libvirt), and the UNIX time it was learnt."""

    state: str = "unknown"
    reason: str | None = None
    since: float | None = None


UNKNOWN = RunState()


@dataclass(frozen=True)
class LifecycleEvent:
    """What on_event receives. ``event``: libvirt's event name ("SUSPENDED"), "LISTED" (the state
    found at a (re)connect) or "DISCONNECTED" (libvirt lost); ``detail``: the raw detail name
    ("SUSPENDED_MIGRATED"; "PAUSED_MIGRATION" when listed; None when disconnected)."""

    name: str
    uuid: str | None
    state: str
    event: str
    detail: str | None
    time: float
    changed: bool  # whether the domain's run state (the word) changed


# -- libvirt's event loop: one per process -----------------------------------------------------


def _thread_safe_impl(libvirtaio: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """libvirtaio's implementation for ``loop``, made safe to call from any thread.

    libvirt adds, updates and removes handles and timers from whichever thread makes an API call
    (a connection opened in a worker thread registers its socket; the test driver arms its event
    timer in the caller's thread), and libvirtaio touches its asyncio loop directly, without
    waking it: a timer armed from another thread would wait for the loop's next wakeup, maybe
    forever. As libvirt's own event loop does, each change is made under a lock and then the loop
    is woken. The lock is never held while calling into libvirt, so it cannot deadlock with
    libvirt's own locks."""

    base = libvirtaio.virEventAsyncIOImpl
    lock = threading.RLock()
    owner = threading.get_ident()

    def wrapped(name: str) -> Callable[..., Any]:
        method = getattr(base, name)

        def call(self: Any, *args: Any) -> Any:
            with lock:
                result = method(self, *args)
            if threading.get_ident() != owner:
                loop.call_soon_threadsafe(_noop)
            return result

        return call

    names = (
        "_add_handle",
        "_update_handle",
        "_remove_handle",
        "_add_timeout",
        "_update_timeout",
        "_remove_timeout",
    )
    cls = type("ThreadSafeAsyncIOImpl", (base,), {n: wrapped(n) for n in names})
    return cls(loop=loop)


def _noop() -> None:
    pass


class _EventThread:
    """libvirtaio registered once, on a private loop in a daemon thread, for the whole process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls, libvirtaio: Any) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    # libvirt prints every error on stderr unless told otherwise (process-wide,
                    # like the event loop); this module gets them as exceptions and logs them.
                    libvirtaio.libvirt.registerErrorHandler(_ignore_error, None)
                    # As virEventRegisterAsyncIOImpl(loop), with the thread-safe implementation.
                    libvirtaio._current_impl = _thread_safe_impl(libvirtaio, loop).register()
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=run, name="libvirt-events", daemon=True).start()
                ready.wait()
                cls._loop = loop
            return cls._loop


# -- the follower --------------------------------------------------------------------------------


class Lifecycle:
    """Follows every domain's run state on libvirt ``uri``; see the module docstring."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.uri = uri
        self.on_event = on_event
        self._clock = clock
        self._states: dict[str, RunState] = {}
        self._uuids: dict[str, str] = {}
        self._libvirt: Any = None
        self._libvirt_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None  # the open connection; touched on the libvirt thread only
        self._callback: int | None = None  # its lifecycle event callback
        self._generation = 0  # of the connection; events of an older one are dropped
        self._closed = asyncio.Event()  # the current connection was lost
        self._first = asyncio.Event()  # the first connect attempt is over (either way)
        self._next_log = 0.0  # monotonic time before which failures are not logged again
        self.connected = False
        self._missing = False  # libvirt-python is not importable (said once)

    # -- the interface ---------------------------------------------------------------------------

    def state(self, name: str) -> RunState:
        """Domain ``name``'s run state; "unknown" for a name libvirt does not list."""
        return self._states.get(name, UNKNOWN)

    def states(self) -> dict[str, RunState]:
        """Every listed domain's run state, by name (a copy)."""
        return dict(self._states)

    async def start(self) -> None:
        """Start following: import libvirt-python (without it, every state stays "unknown": one
        log line), then connect in the background; waits up to FIRST_CONNECT_WAIT seconds for the
        first listing so that a bridge that says it is ready already knows the states."""
        if self._task is not None or self._missing:
            return
        try:
            import libvirt
            import libvirtaio
        except ImportError as e:
            self._missing = True
            log.warning("libvirt-python is not installed (%s): every VM's run state is unknown", e)
            return
        self._libvirt = libvirt
        self._loop = asyncio.get_running_loop()
        self._libvirt_loop = _EventThread.loop(libvirtaio)
        self._first.clear()
        self._task = self._loop.create_task(self._follow(), name="libvirt-lifecycle")
        try:
            await asyncio.wait_for(asyncio.shield(self._first.wait()), FIRST_CONNECT_WAIT)
        except asyncio.TimeoutError:
            log.info("libvirt %s has not answered yet; run states are unknown meanwhile", self.uri)

    async def stop(self) -> None:
        """Stop following and close the connection; the states become "unknown" (no events)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._generation += 1
        if self._libvirt_loop is not None:
            # Queued behind a connect still under way there, if any: it closes what that opens.
            try:
                await self._on_libvirt_thread(self._disconnect)
            except Exception as e:  # noqa: BLE001 - stopping: nothing more to do about it
                log.debug("closing the libvirt connection: %s", e)
        self._states.clear()
        self.connected = False

    # -- on the caller's loop ----------------------------------------------------------------------

    async def _on_libvirt_thread(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` run on the libvirt thread (its blocking calls never block this loop)."""
        assert self._libvirt_loop is not None
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                done.set_exception(e)

        self._libvirt_loop.call_soon_threadsafe(call)
        return await asyncio.wrap_future(done)

    async def _follow(self) -> None:
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        while True:
            self._generation += 1
            gen = self._generation
            self._closed.clear()
            try:
                await self._on_libvirt_thread(functools.partial(self._connect, gen))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - libvirtError: unreachable, refused, ...
                self._first.set()
                self._complain("cannot connect to libvirt %s: %s" % (self.uri, _one_line(e)))
                await asyncio.sleep(backoff.delay())
                continue
            self._first.set()
            up = time.monotonic()
            await self._closed.wait()
            if time.monotonic() - up >= STABLE_LINK:
                backoff.reset()
            await asyncio.sleep(backoff.delay())

    def _complain(self, line: str) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL
            log.warning("%s; run states are unknown until it answers", line)
        else:
            log.debug("%s", line)

    def _deliver(self, gen: int, ev: LifecycleEvent, new: RunState | None) -> None:
        if gen != self._generation:
            return  # from a connection since lost or closed
        if new is not None:
            if new.state == "unknown" and new.reason is None:
                self._states.pop(ev.name, None)
            else:
                self._states[ev.name] = new
        if ev.uuid:
            self._uuids[ev.name] = ev.uuid
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a broken consumer must not stop the follower
                log.exception("run state consumer failed on %s %s", ev.name, ev.detail)

    def _event(self, gen: int, name: str, uuid: str | None, event: int, detail: int) -> None:
        state, ev_name, detail_name = event_state(event, detail)
        now = self._clock()
        old = self.state(name)
        if state is None and ev_name == "DEFINED" and old.state == "unknown":
            # A domain defined while we follow, never listed: a new definition does not run.
            state = "shutoff"
        if state is None:
            new = None
            ev = LifecycleEvent(name, uuid, old.state, ev_name, detail_name, now, False)
        else:
            # The reason is the latest event's; since is when the run state began.
            changed = state != old.state
            new = RunState(state, detail_name, now if changed else old.since)
            ev = LifecycleEvent(name, uuid, state, ev_name, detail_name, now, changed)
        self._deliver(gen, ev, new)

    def _listed(self, gen: int, listing: list[tuple[str, str, int, int]]) -> None:
        if gen != self._generation:
            return
        if not self.connected:
            log.info("following the run states of %d libvirt domains on %s", len(listing), self.uri)
        self.connected = True
        self._next_log = 0.0  # the next failure is news again
        now = self._clock()
        seen = set()
        for name, uuid, code, reason in listing:
            seen.add(name)
            state, why = listed_state(code, reason)
            old = self.state(name)
            changed = state != old.state
            ev = LifecycleEvent(name, uuid, state, "LISTED", why, now, changed)
            self._deliver(gen, ev, RunState(state, why, now if changed else old.since))
        # Gone while we were not listening (a transient domain that stopped): no longer a domain.
        for name in [n for n in self._states if n not in seen]:
            ev = LifecycleEvent(name, self._uuids.get(name), "unknown", "LISTED", None, now, True)
            self._deliver(gen, ev, UNKNOWN)
        self._uuids = {n: u for n, u in self._uuids.items() if n in seen}

    def _lost(self, gen: int, why: str) -> None:
        if gen != self._generation:
            return
        self._generation += 1  # whatever the old connection still dispatches is stale
        self.connected = False
        self._complain("lost the connection to libvirt %s (%s)" % (self.uri, why))
        now = self._clock()
        for name in list(self._states):
            ev = LifecycleEvent(
                name, self._uuids.get(name), "unknown", "DISCONNECTED", None, now, True
            )
            self._deliver(self._generation, ev, UNKNOWN)
        self._closed.set()

    # -- on the libvirt thread -------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is listening any more

    def _connect(self, gen: int) -> None:
        libvirt = self._libvirt
        if self._conn is not None:
            self._disconnect()
        conn = libvirt.openReadOnly(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        except libvirt.libvirtError as e:
            log.debug("libvirt %s: no keepalive: %s", self.uri, e)  # a local driver has none

        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            names = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}
            self._post(self._lost, gen, names.get(reason, "reason %d" % reason))

        def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            # name() and UUIDString() read the domain object: no call to libvirtd.
            self._post(self._event, gen, dom.name(), dom.UUIDString(), event, detail)

        try:
            try:
                conn.registerCloseCallback(on_close, None)
            except libvirt.libvirtError as e:
                log.debug("libvirt %s: no close callback: %s", self.uri, e)
            callback = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None
            )
            # Registered before listing: a change during the listing arrives after it, and wins.
            listing = []
            for dom in conn.listAllDomains(0):
                try:
                    code, reason = dom.state()
                except libvirt.libvirtError:
                    continue  # gone since it was listed
                listing.append((dom.name(), dom.UUIDString(), code, reason))
        except BaseException:
            _quietly(conn.close)
            raise
        self._conn, self._callback = conn, callback
        # Posted from here, before this thread dispatches any event of the new connection.
        self._post(self._listed, gen, listing)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        callback, self._callback = self._callback, None
        if conn is None:
            return
        if callback is not None:
            _quietly(lambda: conn.domainEventDeregisterAny(callback))
        _quietly(conn.unregisterCloseCallback)
        _quietly(conn.close)


def _ignore_error(_opaque: object, _error: object) -> None:
    pass


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - closing a connection that is already broken
        log.debug("libvirt: %s", _one_line(e))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


__all__ = [
    "DEFAULT_URI",
    "RUN_STATES",
    "Lifecycle",
    "LifecycleEvent",
    "RunState",
    "event_state",
    "listed_state",
]
