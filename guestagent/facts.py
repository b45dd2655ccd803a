"""The guest facts the agent publishes about its VM, as keys under ``org.ovmd.guest.`` (pure:
no I/O, docs/cli.md "Guest facts" has the keys for people).

    org.ovmd.guest.hostname        the kernel's host name (uname's nodename)
    org.ovmd.guest.os.name         NAME of /etc/os-release ("Debian GNU/Linux")
    org.ovmd.guest.os.version      VERSION_ID of /etc/os-release ("12"), else its VERSION
    org.ovmd.guest.agent.version   this agent's version ("0.1.0")
    org.ovmd.guest.net.IFNAME      the addresses of interface IFNAME, "192.0.2.10/24 2001:db8::5/64"

guestagent.factwatch gathers the inputs (uname, the os-release file, a netlink dump) and writes
what ``facts()`` returns; everything here can be tested with plain values.
"""

from __future__ import annotations

import socket

from ovmproto.limits import FACTS_PREFIX, VALUE_MAX

from .netlink import IFA_F_DADFAILED, IFF_LOOPBACK, RT_SCOPE_HOST, RT_SCOPE_LINK

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from .netlink import Addr, Link

PREFIX = FACTS_PREFIX
HOSTNAME = PREFIX + "hostname"
OS_NAME = PREFIX + "os.name"
OS_VERSION = PREFIX + "os.version"
AGENT_VERSION = PREFIX + "agent.version"
NET = PREFIX + "net."  # + the interface's name, escaped (interface_key)

# Where the OS describes itself: the first of these that exists (os-release(5)).
OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
OS_RELEASE_MAX = 64 * 1024  # bytes read of it: the file is a few hundred
TEXT_MAX = 256  # characters kept of the host name and of the OS's name and version
MAX_INTERFACES = 64  # interfaces published, by index: a guest with hundreds keeps its quota

# Interface name bytes kept as they are in a key; every other byte is written %XX. Linux allows
# any byte in a name but '/', ':', whitespace and NUL, and a key may hold no '=', no control
# character and only UTF-8 (ovmproto.limits.check_key).
_NAME_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def interface_key(name: bytes) -> str:
    """The key of the interface called ``name`` (the kernel's bytes, at most 15 of them)."""
    return NET + "".join(chr(b) if b in _NAME_SAFE else "%%%02X" % b for b in name)


def is_fact(key: str) -> bool:
    return key.startswith(PREFIX)


def _unquote(raw: str) -> str:
    """An os-release value as a shell would read it: "double" (with \\ escapes of $ " \\ `),
    'single' or bare."""
    raw = raw.strip()
    if not raw:
        return ""
    quote = raw[0]
    if quote == "'":
        end = raw.find("'", 1)
        return raw[1:end] if end > 0 else raw[1:]
    if quote != '"':
        return raw
    out = []
    i = 1
    while i < len(raw):
        ch = raw[i]
        if ch == '"':
            break
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in '$"\\`':
            i += 1
            ch = raw[i]
        out.append(ch)
        i += 1
    return "".join(out)


def parse_os_release(text: str) -> dict[str, str]:
    """The VAR=value assignments of an os-release file; comments and other lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] == "#":
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.replace("_", "").isalnum():
            continue
        out[name] = _unquote(value)
    return out


def _text(value: str | None) -> str | None:
    """``value`` bounded to TEXT_MAX characters; None for nothing to say."""
    if not value:
        return None
    return value[:TEXT_MAX]


def os_facts(release: Mapping[str, str]) -> dict[str, str]:
    """The OS name and version keys for the os-release ``release`` (absent ones are left out)."""
    out: dict[str, str] = {}
    name = _text(release.get("NAME"))
    version = _text(release.get("VERSION_ID") or release.get("VERSION"))
    if name is not None:
        out[OS_NAME] = name
    if version is not None:
        out[OS_VERSION] = version
    return out


def address_text(addr: Addr) -> str:
    # inet_ntop, not ipaddress: the daemon has socket loaded anyway, and its memory is measured.
    return "%s/%d" % (socket.inet_ntop(addr.family, addr.address), addr.prefixlen)


def _shown(addr: Addr) -> bool:
    """An address worth telling the host: not one only this machine or this link can reach
    (loopback, IPv6 link-local), and not one that failed duplicate address detection."""
    if addr.scope == RT_SCOPE_HOST or addr.flags & IFA_F_DADFAILED:
        return False
    return not (addr.family == socket.AF_INET6 and addr.scope == RT_SCOPE_LINK)


def _join(addresses: list[str]) -> str:
    """The addresses, space-separated, as many whole ones as fit in a value."""
    out: list[str] = []
    size = 0
    for text in addresses:
        size += len(text) + (1 if out else 0)
        if size > VALUE_MAX:
            break
        out.append(text)
    return " ".join(out)


def net_facts(links: Iterable[Link], addrs: Iterable[Addr]) -> dict[str, str]:
    """A key per interface except loopback, the first MAX_INTERFACES by index; its value is its
    addresses (IPv4 first, each family in address order), empty when it has none."""
    chosen = sorted(
        (link for link in links if not link.flags & IFF_LOOPBACK), key=lambda link: link.index
    )[:MAX_INTERFACES]
    by_index: dict[int, list[Addr]] = {link.index: [] for link in chosen}
    for addr in addrs:
        mine = by_index.get(addr.index)
        if mine is not None and _shown(addr):
            mine.append(addr)
    out: dict[str, str] = {}
    for link in chosen:
        ordered = sorted(
            by_index[link.index], key=lambda a: (a.family != socket.AF_INET, a.address, a.prefixlen)
        )
        # Several links of one name cannot exist at once; should a dump race a rename, the
        # first one wins and the next event corrects it.
        out.setdefault(interface_key(link.name), _join([address_text(a) for a in ordered]))
    return out


def facts(
    hostname: str | None,
    release: Mapping[str, str] | None,
    agent_version: str,
    net: Mapping[str, str] | None,
) -> dict[str, str]:
    """Every fact key and its value. ``release`` None: the OS is unknown (no os-release); ``net``
    None: the addresses are unknown (netlink failed): their keys are then not in the result."""
    out: dict[str, str] = {AGENT_VERSION: agent_version}
    host = _text(hostname)
    if host is not None:
        out[HOSTNAME] = host
    if release is not None:
        out.update(os_facts(release))
    if net is not None:
        out.update(net)
    return out


def changes(
    current: Mapping[str, str], wanted: Mapping[str, str], keep_net: bool
) -> tuple[list[list[str]], list[str]]:
    """What turns the published facts ``current`` ({key: value} of the cache's fact keys) into
    ``wanted``: ([key, value] to set, keys to delete). Only a changed value is set. With
    ``keep_net`` (the addresses are unknown now) the interface keys are left as they are."""
    sets = [[k, v] for k, v in wanted.items() if current.get(k) != v]
    deletes = [k for k in current if k not in wanted and not (keep_net and k.startswith(NET))]
    return sets, deletes
