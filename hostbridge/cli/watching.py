"""`vmmessage wait` and `vmmessage watch`: the host's side of `ovmd -w`, on the bridge's change
stream (GET /v1/events, a long poll; docs/api.md, "The change stream").

Both follow the stream with a cursor: the id of the last event seen. `wait` takes the cursor
*before* it looks at the key, so a change made between the look and the first poll is in the
stream, never lost between them. A cursor that fell off the bridge's ring (an ``overflow`` event:
the reader was too slow, or the bridge restarted) or a mirror reloaded whole (``keys.refreshed``)
may hide the change that was awaited: `wait` then looks at the key again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from hostbridge import humanize, render
from hostbridge.apiclient import EXIT_OK, ApiError, Client
from hostbridge.cli import out, print_json

POLL = 30.0  # seconds each long poll may wait: well under any proxy's idle limit

JsonObject = dict[str, Any]


def follow(c: Client, vm: str | None, since: int, deadline: float | None) -> Iterator[JsonObject]:
    """The events after ``since`` as they come, until ``deadline`` (time.monotonic()) passes."""
    while True:
        left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
        if left <= 0:
            return
        doc = c.events(since=since, vm=vm, timeout=round(left, 3))
        since = doc["last"]
        yield from doc["events"]


def _look(c: Client, vm: str, key: str) -> JsonObject | None:
    try:
        return c.query(vm, key)
    except ApiError as exc:
        if exc.code != "not_found":
            raise
        return None


def _same(a: JsonObject | None, b: JsonObject | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.get("value"), a.get("ts"), a.get("origin")) == (
        b.get("value"),
        b.get("ts"),
        b.get("origin"),
    )


def _deleted(vm: str, key: str, origin: object) -> JsonObject:
    return {"vm": vm, "key": key, "deleted": True, "origin": origin}


def wait_for(c: Client, vm: str, key: str, changed: bool, timeout: float | None) -> JsonObject:
    """KEY's value once it is set (``changed``: set again or deleted after this call began), as
    `vmmessage query` answers it; {"deleted": true, ...} for a deletion. ApiError "wait_timeout"
    when ``timeout`` seconds pass first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    since = c.events(vm=vm)["last"]  # first the cursor: see the module's docstring
    before = _look(c, vm, key)
    if before is not None and not changed:
        return before
    for ev in follow(c, vm, since, deadline):
        kind = ev.get("type")
        if kind == "key.set" and ev.get("key") == key:
            if ev.get("hidden") or "value" not in ev:
                after = _look(c, vm, key)  # a log=no value is not in the stream: ask for it
                if after is not None:
                    return after
                continue
            return {
                "vm": vm,
                "key": key,
                "value": ev["value"],
                "ts": ev.get("set_time"),
                "origin": ev.get("origin"),
                "stale": False,
                "last_seen": ev.get("time"),
            }
        if changed and (
            (kind == "key.deleted" and ev.get("key") == key)
            or (kind == "keys.cleared" and before is not None)
        ):
            return _deleted(vm, key, ev.get("origin"))
        if kind in ("overflow", "keys.refreshed"):
            now = _look(c, vm, key)
            if not changed and now is not None:
                return now
            if changed and not _same(before, now):
                return now if now is not None else _deleted(vm, key, None)
    raise ApiError(
        "wait_timeout",
        "key %r of VM %r was not %s within %g s"
        % (key, vm, "changed" if changed else "set", timeout or 0),
    )


def wait_lines(doc: JsonObject, now: float) -> list[str]:
    if doc.get("deleted"):
        return ["Key '%s' was deleted." % humanize.escape(str(doc["key"]))]
    return render.query_lines(doc, now)


def _value(ev: JsonObject) -> str:
    if ev.get("hidden"):
        return " (value not shown: sent with log off)"
    return " = '%s'" % humanize.escape(str(ev.get("value", "")))


def event_line(ev: JsonObject) -> str:
    """One event as a line: time, VM, type, then what it says (guest strings escaped)."""
    kind = str(ev.get("type"))
    vm = humanize.escape(str(ev.get("vm") or "-"))
    stamp = render.utc(ev.get("time"))
    head = "%s %s %s" % (stamp, vm, kind)
    key = humanize.escape(str(ev.get("key", "")))
    if kind == "key.set":
        return "%s %s%s (%s)" % (head, key, _value(ev), ev.get("origin"))
    if kind == "key.deleted":
        return "%s %s (%s)" % (head, key, ev.get("origin"))
    if kind == "keys.cleared":
        return "%s (%s)" % (head, ev.get("origin"))
    if kind == "agent.state":
        version = ev.get("agent_version")
        extra = " (agent %s)" % humanize.escape(str(version)) if version else ""
        return "%s %s%s" % (head, ev.get("agent"), extra)
    if kind == "vm.state":
        reason = ev.get("reason")
        return "%s %s%s" % (head, ev.get("run_state"), " (%s)" % reason if reason else "")
    if kind == "vm.placed":
        host = ev.get("host")
        return "%s %s" % (head, "on " + humanize.escape(str(host)) if host else "on no host")
    if kind.startswith("message."):
        return "%s seq %s%s" % (head, ev.get("seq"), " key %s" % key if key else "")
    if kind == "overflow":
        missed = ev.get("missed")
        return "%s events were missed (%s); what is shown may be out of date" % (
            head,
            "unknown how many" if missed is None else "%s of them" % missed,
        )
    return head


def watch(c: Client, vm: str | None, as_json: bool) -> int:
    """Print the events (of ``vm`` only, when given) as they come, until interrupted."""
    since = c.events(vm=vm)["last"]
    for ev in follow(c, vm, since, None):
        if as_json:
            print_json(ev)
        else:
            out(event_line(ev))
        sys.stdout.flush()  # a pipe (`| grep`) sees each event as it happens
    return EXIT_OK
