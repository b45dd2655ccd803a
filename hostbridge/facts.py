"""A VM's guest facts (host name, OS, agent version, addresses) from the mirror of its keys.

The guest agent publishes them under ``org.ovmd.guest.`` (docs/cli.md, "Guest facts"); this turns
those keys into one record for the API (``VmInfo.facts``) and ``vmmessage status``. Pure: no I/O.

Everything here comes from a guest, and a guest is untrusted: a value of the wrong shape is left
out rather than shown or refused wholesale, strings are cut to bounded lengths, at most
MAX_INTERFACES interfaces of at most MAX_ADDRESSES addresses each are kept, and an address is kept
only when it parses as one. Strings are not escaped here: whoever prints them does that
(hostbridge.humanize.escape), as for every guest string.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ovmproto.limits import FACTS_PREFIX
from ovmproto.messages import ORIGIN_GUEST

PREFIX = FACTS_PREFIX
HOSTNAME = PREFIX + "hostname"
OS_NAME = PREFIX + "os.name"
OS_VERSION = PREFIX + "os.version"
AGENT_VERSION = PREFIX + "agent.version"
NET = PREFIX + "net."

TEXT_MAX = 256  # characters kept of a host name, an OS name or version, an agent version
NAME_MAX = 64  # characters of an interface's name (the agent's are at most 45: 15 bytes as %XX)
MAX_INTERFACES = 64
MAX_ADDRESSES = 64  # per interface
# Why a send of such a key is refused (400 bad_request): the facts are the agent's own.
RESERVED_MESSAGE = (
    "keys under %s are the guest agent's own facts; the host cannot set them" % PREFIX
)
_ADDRESS_MAX = 50  # characters of one "address/prefix" (IPv6 with a prefix is at most 43)


class _Entry(Protocol):
    """What the mirror keeps of a key (hostbridge.mirror.Entry)."""

    value: str | None
    ts: float
    origin: str


def is_fact(key: str) -> bool:
    return key.startswith(PREFIX)


@dataclass
class Facts:
    hostname: str | None = None
    os_name: str | None = None
    os_version: str | None = None
    agent_version: str | None = None
    interfaces: dict[str, list[str]] = field(default_factory=dict)
    updated: float | None = None  # the latest set time of the facts kept (the guest's clock)

    def to_json(self) -> dict[str, Any]:
        """Only what the guest told: {} for a VM without facts."""
        out: dict[str, Any] = {}
        for name in ("hostname", "os_name", "os_version", "agent_version"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.interfaces:
            out["interfaces"] = {k: list(v) for k, v in self.interfaces.items()}
        if out and self.updated is not None:
            out["updated"] = self.updated
        return out


def _text(value: str) -> str | None:
    return value[:TEXT_MAX] if value else None


def _addresses(value: str) -> tuple[str, ...] | None:
    """The valid "address/prefix" words of ``value``, normalized; None when a word is not one
    (the whole interface is then left out: a guest that sends garbage gets no partial answer)."""
    if len(value) <= _CACHED_MAX:
        return _parsed(value)
    return _parse_addresses(value)


def _parse_addresses(value: str) -> tuple[str, ...] | None:
    out: list[str] = []
    for word in value.split(" ", MAX_ADDRESSES)[:MAX_ADDRESSES]:
        if not word:
            continue
        if len(word) > _ADDRESS_MAX or "/" not in word:
            return None
        try:
            out.append(str(ipaddress.ip_interface(word)))
        except ValueError:
            return None
    return tuple(out)


# Listing 1,000 VMs parses every VM's addresses each time, and they rarely change: the answers
# for short values are kept (bounded: at most _CACHED entries of at most _CACHED_MAX characters).
_CACHED = 4096
_CACHED_MAX = 256
_parsed = functools.lru_cache(maxsize=_CACHED)(_parse_addresses)


def _number(ts: object) -> float | None:
    return float(ts) if isinstance(ts, (int, float)) and ts == ts and abs(ts) < 1e12 else None


def from_items(items: Iterable[tuple[str, str | None, float, str]]) -> Facts:
    """The facts among ``items`` (key, value, set time, origin); other keys are ignored, and
    facts with another origin than the guest's (the agent refuses them from the host), without
    a value or of the wrong type are left out."""
    facts = Facts()
    latest: float | None = None
    for key, value, ts, origin in items:
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        if origin != ORIGIN_GUEST or not isinstance(value, str):
            continue
        kept = True
        if key == HOSTNAME:
            facts.hostname = _text(value)
        elif key == OS_NAME:
            facts.os_name = _text(value)
        elif key == OS_VERSION:
            facts.os_version = _text(value)
        elif key == AGENT_VERSION:
            facts.agent_version = _text(value)
        elif key.startswith(NET) and len(facts.interfaces) < MAX_INTERFACES:
            name = key[len(NET) :]
            addresses = _addresses(value)
            if not name or len(name) > NAME_MAX or addresses is None:
                continue
            facts.interfaces[name] = list(addresses)
        else:
            kept = False
        stamp = _number(ts)
        if kept and stamp is not None and (latest is None or stamp > latest):
            latest = stamp
    facts.interfaces = dict(sorted(facts.interfaces.items()))
    facts.updated = latest
    return facts


def from_mirror(entries: Mapping[str, _Entry], keys: Iterable[str]) -> Facts:
    """The facts of a mirror's ``entries``, looking only at ``keys`` (its fact keys, which the
    mirror keeps apart so that listing 1,000 VMs costs no scan of their other keys)."""
    items = []
    for key in sorted(keys):  # sorted: which interfaces are kept must not depend on set order
        entry = entries.get(key)
        if entry is not None:
            items.append((key, entry.value, entry.ts, entry.origin))
    return from_items(items)
