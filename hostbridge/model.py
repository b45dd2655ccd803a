"""Plain records the bridge hands to its callers (API, CLI). JSON-ready via ``to_json()``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _Json:
    # Every subclass is a dataclass: this tells the type checker that dataclasses.fields() applies.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, ~5% of the bridge's time per answer.
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = [x.to_json() if isinstance(x, _Json) else x for x in v]
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
        return out


def zero_counters() -> dict[str, int]:
    return {
        "frames_in": 0,
        "frames_out": 0,
        "bad_frames": 0,
        "dropped_rate_limited": 0,
        "timeouts": 0,
        "resyncs": 0,
        "reconnects": 0,
        "failed_links": 0,  # links that ended before they were stable (hostbridge.backoff)
        "reconnects_delayed": 0,  # connects held back by the VM's reconnect budget
        "refused_keys": 0,  # guest-announced keys or values the protocol forbids, not mirrored
    }


@dataclass
class VmInfo(_Json):
    name: str
    channel: str  # "unix:/path" or "pty:/path"
    source: str  # "config" | "flag" | "discovered"
    agent: str = "disconnected"  # "connected" | "connecting" | "disconnected"
    agent_version: str | None = None
    last_seen: float | None = None
    queued: int = 0
    connected_since: float | None = None
    counters: dict[str, int] = field(default_factory=zero_counters)
    # From libvirt (hostbridge.lifecycle): running, paused, shutoff, crashed, migrating, unknown.
    run_state: str = "unknown"
    # What the guest agent says of its VM (hostbridge.facts): {} when it published nothing.
    facts: dict[str, Any] = field(default_factory=dict)
    # In a pool (docs/pool.md): the host that owns the VM (None: nobody now); None on one host.
    host: str | None = None


@dataclass
class SendResult(_Json):
    vm: str
    key: str
    outcome: str  # "delivered" | "queued"
    seq: int
    replayed: bool = False  # the answer to a retry (same idempotency key): nothing new was sent
    run_state: str = "unknown"  # the VM's, from libvirt (hostbridge.lifecycle), at the answer


@dataclass
class QueuedMessage(_Json):
    """A message waiting for delivery, as the queue listing shows it: never its value."""

    seq: int
    key: str
    op: str  # "set" | "del"
    size: int  # bytes of UTF-8 in the value
    log: bool
    created: float
    expires: float | None = None  # UNIX time; None: never
    in_flight: bool = False  # written to the guest, not yet acknowledged


@dataclass
class QueueList(_Json):
    vm: str
    messages: list[QueuedMessage] = field(default_factory=list)


@dataclass
class CancelResult(_Json):
    vm: str
    cancelled: list[int] = field(default_factory=list)  # seqs withdrawn, never to be delivered
    in_flight: list[int] = field(default_factory=list)  # seqs the guest may hold: value erased


@dataclass
class KeyValue(_Json):
    vm: str
    key: str
    value: str
    ts: float
    origin: str  # "host" | "guest"
    stale: bool = False
    last_seen: float | None = None


@dataclass
class KeyList(_Json):
    vm: str
    entries: list[KeyValue] = field(default_factory=list)
    stale: bool = False
    last_seen: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "entries": [e.to_json() for e in self.entries],
            "stale": self.stale,
            "last_seen": self.last_seen,
        }


@dataclass
class AuditRow(_Json):
    id: int
    vm: str
    key: str
    size: int  # bytes of UTF-8
    ts: float
    outcome: str  # "delivered" | "queued" | "refused" | "failed" | "cancelled" | "expired" | ...
    value: str | None = None  # only when the send had log on; at most 1024 bytes
