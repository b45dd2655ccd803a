"""Every human line `vmmessage` and `ovm_vmmessage` print, in one place (docs/cli-host.md).

A ``*_lines(doc, now)`` function turns one answer of the bridge's API (docs/api.md) into the lines
to print, without newlines; ``now`` (UNIX time) is a parameter so that the text is testable. Every
string that may come from a guest goes through humanize.escape, so nothing a guest sends can drive
the operator's terminal. Nothing here writes anywhere: the callers print.

On the fast path of ``vmmessage query`` (see hostbridge.cli): it imports only time and humanize.
"""

import time

from hostbridge import humanize
from hostbridge.humanize import escape

TYPE_CHECKING = False  # mypy takes a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from hostbridge.apiclient import JsonObject

_QUEUED = (
    "Message queued: the agent in VM '%s' is not connected; it will be delivered when it connects."
)
_DELETION_QUEUED = (
    "Deletion queued: the agent in VM '%s' is not connected; it will be done when it connects."
)
# The VM is not running (hostbridge.lifecycle): its agent connects at the VM's next boot.
_QUEUED_UNTIL_BOOT = {
    "shutoff": "Message queued: VM '%s' is shut off; it will be delivered at its next boot.",
    "crashed": "Message queued: VM '%s' has crashed; it will be delivered at its next boot.",
}
_DELETION_QUEUED_UNTIL_BOOT = {
    "shutoff": "Deletion queued: VM '%s' is shut off; it will be done at its next boot.",
    "crashed": "Deletion queued: VM '%s' has crashed; it will be done at its next boot.",
}


def one_line(text: object) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), escaped."""
    return escape(" ".join(str(text).split()))


def error_line(prog: str, reason: object) -> str:
    """``PROG: error: REASON``: how both commands report a failure on stderr."""
    return "%s: error: %s" % (prog, one_line(reason))


def usage_line(prog: str, reason: object, command: str) -> str:
    """``PROG: error: REASON (see COMMAND --help)``: a command line that could not be parsed."""
    return "%s (see %s --help)" % (error_line(prog, reason).rstrip("."), command)


def utc(ts: object) -> str:
    """``2026-11-22 09:04:29 UTC``, or "-" when the bridge gave no time."""
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _ago(ts: object, now: float, whole_minutes: bool = False) -> str:
    if not isinstance(ts, (int, float)):
        return "at an unknown time"
    return humanize.minutes_ago(ts, now) if whole_minutes else humanize.ago(ts, now)


def stale_line(last_seen: object, now: float) -> str:
    """The marker under an answer that came from the bridge's mirror, not the live agent."""
    if isinstance(last_seen, (int, float)):
        return "(stale: the agent was last seen %s)" % humanize.ago(last_seen, now)
    return "(stale: the agent has not been seen since the bridge started)"


def _marked(lines: list[str], doc: "JsonObject", now: float) -> list[str]:
    if doc.get("stale"):
        lines.append(stale_line(doc.get("last_seen"), now))
    return lines


def _outcome(
    doc: "JsonObject", queued: str, done: str, until_boot: "dict[str, str] | None" = None
) -> list[str]:
    # A send or a delete is done, or queued in the bridge until the VM's agent connects (at the
    # VM's next boot when libvirt says it is not running).
    if doc.get("outcome") != "queued":
        return [done]
    line = (until_boot or {}).get(str(doc.get("run_state")), queued)
    return [line % escape(doc.get("vm", ""))]


def query_lines(doc: "JsonObject", now: float, *, whole_minutes: bool = False) -> list[str]:
    """A key's value and when it was set (the original tool's phrases), then the stale marker.

    ``whole_minutes``: the age as the original `ovm_vmmessage` printed it, "Key set N minutes ago."
    (scripts parse it; humanize.minutes_ago) instead of `vmmessage`'s friendlier humanize.ago.
    """
    lines = [
        "Query for Key : '%s' returned value '%s'." % (escape(doc["key"]), escape(doc["value"])),
        "Key set %s." % _ago(doc.get("ts"), now, whole_minutes),
    ]
    return _marked(lines, doc, now)


def send_lines(doc: "JsonObject", now: float) -> list[str]:
    """Sent, or queued until the agent connects (or the VM's next boot, when it is shut off)."""
    return _outcome(doc, _QUEUED, "Message sent successfully.", _QUEUED_UNTIL_BOOT)


def vm_table(doc: "JsonObject", now: float) -> list[str]:
    """``{"vms": [...]}`` as a table: name, run state, agent state, last seen, queued count,
    channel; in a pool (docs/pool.md) a HOST column after the name, "-" for a VM nobody owns."""
    pooled = any(vm.get("host") is not None for vm in doc["vms"])
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "AGENT", "LAST SEEN", "QUEUED", "CHANNEL")]
    for vm in doc["vms"]:
        if vm.get("agent") == "connected":
            seen = "now"
        elif vm.get("last_seen") is None:
            seen = "never"
        else:
            seen = _ago(vm.get("last_seen"), now)
        rows.append(
            (
                escape(vm["name"]),
                escape(str(vm.get("run_state", "unknown"))),
                escape(str(vm.get("agent", "?"))),
                seen,
                str(vm.get("queued", 0)),
                escape(vm.get("channel", "")),
            )
        )
    if pooled:
        hosts = ["HOST"] + [escape(str(vm.get("host") or "-")) for vm in doc["vms"]]
        rows = [(row[0], host, *row[1:]) for row, host in zip(rows, hosts)]
    # The channel, last and the longest, is not padded.
    last = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[last] for row in rows]
    if len(rows) == 1:
        lines.append("(no VMs)")
    return lines


def status_lines(vm: "JsonObject", now: float) -> list[str]:
    """One VM's details: channel, run state, agent, connected since, last seen, queued,
    counters."""
    agent = escape(str(vm.get("agent", "?")))
    if vm.get("agent_version"):
        agent += " (agent version %s)" % escape(str(vm["agent_version"]))
    lines = [
        "VM : '%s'" % escape(vm["name"]),
        "Channel: %s (%s)" % (escape(vm.get("channel", "")), escape(str(vm.get("source", "?")))),
        "State: %s" % escape(str(vm.get("run_state", "unknown"))),
        "Agent: %s" % agent,
    ]
    since = vm.get("connected_since")
    if since is not None and vm.get("agent") == "connected":
        lines.append("Connected since: %s (%s)" % (utc(since), _ago(since, now)))
    last = vm.get("last_seen")
    lines.append(
        "Last seen: %s"
        % ("%s (%s)" % (utc(last), _ago(last, now)) if last is not None else "never")
    )
    lines.append("Queued messages: %s" % vm.get("queued", 0))
    lines.extend(facts_lines(vm.get("facts"), now))
    counters = vm.get("counters") or {}
    if counters:
        lines.append(
            "Counters: " + ", ".join("%s=%s" % (k, v) for k, v in sorted(counters.items()))
        )
    return lines


def facts_lines(facts: object, now: float) -> list[str]:
    """What the guest agent says of its VM (VmInfo.facts, hostbridge.facts): host name, OS, one
    line per interface with its addresses; nothing when it said nothing. Guest strings, escaped."""
    if not isinstance(facts, dict) or not facts:
        return []
    lines = []
    if facts.get("hostname"):
        lines.append("Guest host name: %s" % escape(str(facts["hostname"])))
    system = " ".join(str(facts[k]) for k in ("os_name", "os_version") if facts.get(k))
    if system:
        lines.append("Guest OS: %s" % escape(system))
    interfaces = facts.get("interfaces")
    for name, addresses in sorted(interfaces.items() if isinstance(interfaces, dict) else ()):
        shown = " ".join(str(a) for a in addresses) if isinstance(addresses, list) else ""
        lines.append(
            "Guest interface %s: %s" % (escape(str(name)), escape(shown) or "(no address)")
        )
    updated = facts.get("updated")
    if isinstance(updated, (int, float)):
        lines.append("Guest facts set: %s (%s)" % (utc(updated), _ago(updated, now)))
    return lines


def keys_lines(doc: "JsonObject", now: float) -> list[str]:
    """Every key of a VM with its value, age and origin, then the stale marker."""
    lines = [
        "%s = '%s'  (set %s by the %s)"
        % (
            escape(e["key"]),
            escape(e["value"]),
            _ago(e.get("ts"), now),
            escape(str(e.get("origin", "?"))),
        )
        for e in doc.get("entries", [])
    ]
    return _marked(lines or ["(no keys)"], doc, now)


def rm_lines(doc: "JsonObject", now: float) -> list[str]:
    """Deleted, or the deletion queued until the agent connects (or the VM's next boot)."""
    return _outcome(
        doc,
        _DELETION_QUEUED,
        "Key '%s' deleted." % escape(doc.get("key", "")),
        _DELETION_QUEUED_UNTIL_BOOT,
    )


def queue_lines(doc: "JsonObject", now: float) -> list[str]:
    """The messages waiting for delivery, oldest first: seq, age, expiry, size, key (no value)."""
    rows = [("SEQ", "QUEUED", "EXPIRES", "SIZE", "KEY")]
    for m in doc.get("messages", []):
        key = escape(m.get("key", ""))
        if m.get("op") == "del":
            key += " (delete)"
        if m.get("in_flight"):
            key += " (in flight)"
        rows.append(
            (
                str(m.get("seq", "?")),
                _ago(m.get("created"), now),
                utc(m["expires"]) if m.get("expires") is not None else "never",
                "%d bytes" % m.get("size", 0),
                key,
            )
        )
    if len(rows) == 1:
        return ["No message to VM '%s' is waiting for delivery." % escape(doc.get("vm", ""))]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows]


def cancel_lines(doc: "JsonObject", now: float) -> list[str]:
    """What a cancel withdrew, and what was already on its way to the guest."""
    vm = escape(doc.get("vm", ""))
    cancelled = doc.get("cancelled") or []
    in_flight = doc.get("in_flight") or []
    lines = []
    if len(cancelled) == 1:
        lines.append("Message %s to VM '%s' cancelled." % (cancelled[0], vm))
    elif cancelled:
        lines.append(
            "%d messages to VM '%s' cancelled: %s."
            % (len(cancelled), vm, ", ".join(str(s) for s in cancelled))
        )
    for seq in in_flight:
        lines.append(
            "Message %s to VM '%s' was already written to the agent: its value is erased from "
            "the bridge and it will not be sent again; the audit will say whether it arrived."
            % (seq, vm)
        )
    return lines or ["No message to VM '%s' is waiting for delivery." % vm]


def audit_lines(doc: "JsonObject", now: float) -> list[str]:
    """The audit trail, newest first: time, outcome, key, size, value or "(not logged)"."""
    lines = []
    for row in doc.get("entries", []):
        value = row.get("value")
        lines.append(
            "%s  %-9s  %s  %d bytes  %s"
            % (
                utc(row.get("ts")),
                escape(str(row.get("outcome", "?"))),
                escape(row.get("key", "")),
                row.get("size", 0),
                "'%s'" % escape(value) if value is not None else "(not logged)",
            )
        )
    return lines or ["(no audit rows)"]


# Oracle VM Manager's words for a VM's status, by run state (hostbridge.lifecycle).
MANAGER_STATUS = {
    "running": "Running",
    "paused": "Suspended",
    "shutoff": "Stopped",
    "crashed": "Error",
    "migrating": "Migrating",
}


def manager_status(vm: "JsonObject") -> str:
    """The status `ovm_vmmessage` prints for ``vm`` (a VmInfo), in the manager's words. Without
    a run state from libvirt, an agent that answers proves the VM runs; otherwise "Unknown"."""
    status = MANAGER_STATUS.get(str(vm.get("run_state")))
    if status is None:
        status = "Running" if vm.get("agent") == "connected" else "Unknown"
    return status


def manager_time(now: float) -> str:
    """``2026-11-22 09:04:29,890 UTC`` (the manager CLI's Time: line, always in UTC)."""
    return "%s,%03d UTC" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        int(now * 1000) % 1000,
    )


def manager_lines(
    args: list[str], now: float, *, error: object = None, doc: "JsonObject | None" = None
) -> list[str]:
    """The manager CLI's answer to ``sendVmMessage ARGS``: Command:, Status:, Time:, then
    ``Error Msg:`` (when ``error`` is given) or, for a queued message (``doc``), the queued line."""
    lines = [
        "Command: sendVmMessage %s" % escape(" ".join(args)),
        "Status: %s" % ("Success" if error is None else "Failure"),
        "Time: %s" % manager_time(now),
    ]
    if error is not None:
        lines.append("Error Msg: %s" % one_line(error))
    elif doc is not None and doc.get("outcome") == "queued":
        lines.extend(send_lines(doc, now))
    return lines


def configure_sent_line(vm: str, count: int, queued: int) -> str:
    if queued:
        return (
            "Configuration sent to VM '%s': %d messages, %d queued until its agent connects "
            "(they are delivered in order at its first boot)." % (escape(vm), count, queued)
        )
    return "Configuration sent to VM '%s': %d messages, all delivered." % (escape(vm), count)


def configure_no_report(vm: str, timeout: float) -> str:
    return (
        "no report of the template configuration from VM '%s' within %gs (is the VM running, "
        "and was its image sealed with `ovmd -s cleanup`?)" % (escape(vm), timeout)
    )


def configure_report_lines(vm: str, state: str, error: str, modules: "dict[str, str]") -> list[str]:
    """The guest's report: its state (and error), then each module's outcome, escaped: it comes
    from the guest."""
    head = "Template configuration of VM '%s': %s." % (escape(vm), escape(state))
    if error:
        head = "Template configuration of VM '%s': %s: %s" % (escape(vm), escape(state),
                                                              escape(error))  # fmt: skip
    width = max([len(escape(m)) for m in modules] + [1])
    return [head] + [
        "  %-*s  %s" % (width, escape(name), escape(outcome))
        for name, outcome in sorted(modules.items())
    ]
