"""libvirt's lifecycle events played by a test, for a bridge running as a real process.

hostbridge.lifecycle.Lifecycle follows a real libvirtd; a test of a pool of hosts needs three
"hypervisors" on one machine and full control of when each event happens (a migration's
SUSPENDED_MIGRATED, then RESUMED_MIGRATED on another host...). SimLifecycle has Lifecycle's
interface (start, stop, state, states, connected) and takes its events from a unix socket instead:

    lc = SimLifecycle("/tmp/x/events.sock", on_event)     # what Bridge.lifecycle_factory makes
    await lc.start()                                        # listens; lists the recorded domains

    send_event("/tmp/x/events.sock", "web1", "RESUMED", "RESUMED_MIGRATED", "running")

Each line a controller writes is one JSON object {"name", "event", "detail", "state"}; the
follower updates its states, calls on_event(LifecycleEvent) on its loop, and only then answers
"ok\\n", so that a controller that got its answer knows the bridge has seen the event (and has
acted on it, as far as on_event acts synchronously).

libvirtd keeps its domains' states whether or not a bridge follows them, and a bridge that starts
(or restarts after a kill -9) lists them ("LISTED" events). Here the controller is libvirtd:
send_event() records each domain's state in ``<socket>.states`` before it delivers the event, even
when no bridge listens (a dead bridge misses the event, as it would miss libvirt's), and start()
lists what that file holds, in a listing's words (listed_detail(): "RUNNING_MIGRATED", not the
event "RESUMED_MIGRATED" a bridge acts on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from hostbridge.lifecycle import REASONS, RUN_STATES, STATES, UNKNOWN, LifecycleEvent, RunState

log = logging.getLogger(__name__)

STATES_SUFFIX = ".states"
# A lifecycle event's answer: the bridge's on_event may write to the database; on a machine shared
# by several test runs that can take a while, but never this long.
ANSWER_TIMEOUT = 30.0
_MAX_LINE = 64 * 1024


# virDomainGetState's state for each run state, as a listing reports it.
_LISTED_STATE = {"running": 1, "paused": 3, "migrating": 3, "shutoff": 5, "crashed": 6}


def listed_detail(state: str, detail: str | None) -> str | None:
    """What a listing says of a domain whose last event was ``detail`` (its state now ``state``),
    in virDomainGetState's names as hostbridge.lifecycle.listed_state() gives them: a domain
    that came in by migration lists as "RUNNING_MIGRATED", never as the event
    "RESUMED_MIGRATED" that a bridge acts on."""
    code = _LISTED_STATE.get(state)
    if code is None:
        return None
    if state == "migrating":
        return "PAUSED_MIGRATION"
    reason = (detail or "").partition("_")[2]
    if reason == "PAUSED":
        reason = "USER"
    if reason not in REASONS[code].values():
        reason = "UNKNOWN"
    return "%s_%s" % (STATES[code], reason)


def states_path(events_socket_path: str) -> str:
    """Where the controller records the domains' states for ``events_socket_path``'s follower."""
    return events_socket_path + STATES_SUFFIX


def read_states(events_socket_path: str) -> dict[str, dict[str, str | None]]:
    """The recorded domains: name -> {"state", "detail"} ({} when none was recorded)."""
    try:
        with open(states_path(events_socket_path), encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    return {str(k): dict(v) for k, v in doc.items()}


def record_state(events_socket_path: str, name: str, state: str, detail: str | None) -> None:
    """Record domain ``name``'s state as libvirtd would hold it (atomically: a follower that
    starts meanwhile reads the old file or the new one)."""
    states = read_states(events_socket_path)
    states[name] = {"state": state, "detail": detail}
    path = states_path(events_socket_path)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(states, f)
    os.replace(tmp, path)


def send_event(
    events_socket_path: str,
    name: str,
    event: str,
    detail: str | None,
    state: str,
    timeout: float = ANSWER_TIMEOUT,
) -> bool:
    """Play one lifecycle event of domain ``name``: record its state, then hand the event to the
    follower listening on ``events_socket_path`` and wait until it has seen it.

    True when a follower saw it; False when none listens (its bridge is down: the state is
    recorded all the same, and listed when the bridge starts). AssertionError when the follower
    refuses the line or does not answer in time."""
    if state not in RUN_STATES:
        raise ValueError("state %r is not one of %s" % (state, ", ".join(RUN_STATES)))
    record_state(events_socket_path, name, state, detail)
    line = json.dumps({"name": name, "event": event, "detail": detail, "state": state})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(events_socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        s.sendall(line.encode("utf-8") + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                raise AssertionError(
                    "the bridge did not take lifecycle event %s of %r within %.0f s"
                    % (detail, name, timeout)
                ) from None
            if not chunk:
                # The bridge died while it handled the event (a test may kill it meanwhile).
                return False
            answer += chunk
    finally:
        s.close()
    if answer != b"ok\n":
        raise AssertionError(
            "the bridge refused lifecycle event %s of %r: %s"
            % (detail, name, answer.decode("utf-8", "replace").strip())
        )
    return True


class SimLifecycle:
    """Lifecycle's interface, its events played through the unix socket ``events_socket_path``
    (see the module docstring)."""

    def __init__(
        self,
        events_socket_path: str,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = events_socket_path
        self.on_event = on_event
        self._clock = clock
        self._states: dict[str, RunState] = {}
        self._server: asyncio.AbstractServer | None = None
        self.connected = False

    # -- Lifecycle's interface --------------------------------------------------------------------

    def state(self, name: str) -> RunState:
        return self._states.get(name, UNKNOWN)

    def states(self) -> dict[str, RunState]:
        return dict(self._states)

    async def start(self) -> None:
        """Listen, then list the recorded domains (LISTED events), as a connect to libvirtd does.
        Listening first: an event recorded after the listing reaches the socket and follows it;
        one recorded before it is listed (and maybe delivered again: the same state)."""
        if self._server is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a bridge killed with -9 left it
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=_MAX_LINE)
        self.connected = True
        now = self._clock()
        for name, recorded in sorted(read_states(self.path).items()):
            state = str(recorded.get("state") or "unknown")
            self._apply(name, "LISTED", listed_detail(state, recorded.get("detail")), state, now)
        log.info("following played lifecycle events on %s", self.path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._states.clear()
        self.connected = False

    # -- the played events ----------------------------------------------------------------------

    def _apply(self, name: str, event: str, detail: str | None, state: str, now: float) -> None:
        old = self.state(name)
        changed = state != old.state
        self._states[name] = RunState(state, detail, now if changed else old.since)
        if self.on_event is not None:
            ev = LifecycleEvent(name, None, state, event, detail, now, changed)
            try:
                self.on_event(ev)
            except Exception:  # as Lifecycle: a broken consumer must not stop the follower
                log.exception("run state consumer failed on %s %s", name, detail)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError):
                    break  # a line over the limit, or the controller went away
                if not line:
                    break
                answer = self._line(line)
                writer.write(answer.encode("utf-8") + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _line(self, line: bytes) -> str:
        try:
            doc: Any = json.loads(line)
            name, event, state = doc["name"], doc["event"], doc["state"]
            detail = doc.get("detail")
        except (ValueError, KeyError, TypeError):
            return "error: not a JSON object with name, event and state"
        if not (isinstance(name, str) and isinstance(event, str) and state in RUN_STATES):
            return "error: bad name, event or state"
        if detail is not None and not isinstance(detail, str):
            return "error: bad detail"
        self._apply(name, event, detail, state, self._clock())
        return "ok"


def factory(events_socket_path: str) -> Callable[[str, Callable[[LifecycleEvent], None]], Any]:
    """A Bridge.lifecycle_factory that follows ``events_socket_path`` (the URI is ignored)."""

    def make(_uri: str, on_event: Callable[[LifecycleEvent], None]) -> SimLifecycle:
        return SimLifecycle(events_socket_path, on_event)

    return make


__all__ = [
    "SimLifecycle",
    "factory",
    "listed_detail",
    "read_states",
    "record_state",
    "send_event",
    "states_path",
]
