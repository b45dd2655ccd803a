"""The kernel's routing netlink (AF_NETLINK, NETLINK_ROUTE), as much as the guest facts need: the
interfaces (RTM_NEWLINK) and their addresses (RTM_NEWADDR), read with struct.

Two uses (guestagent.factwatch): a socket subscribed to the link and address multicast groups
tells that something changed, and a dump on a second socket reads the whole current state. The
events are only a trigger: the dump is the truth, so an event lost to a full receive buffer
(ENOBUFS) costs nothing but the next dump.

The parsers take bytes and return plain records; they never raise on what the kernel (or a test)
hands them: a message or attribute cut short ends the parse of that buffer.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Iterator

# <linux/netlink.h>
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
EVENT_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
# <linux/if_link.h>, <linux/if_addr.h>, <linux/if.h>
IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_DADFAILED = 0x08
IFF_LOOPBACK = 0x8
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")

RECV_SIZE = 65536
DUMP_TIMEOUT = 2.0  # seconds for the kernel to answer a dump; it answers at once


class NetlinkError(OSError):
    """The kernel refused a request or a dump could not be read."""


class Link:
    """An interface: its index, its name as the kernel's bytes, its IFF_* flags."""

    __slots__ = ("index", "name", "flags")

    def __init__(self, index: int, name: bytes, flags: int) -> None:
        self.index = index
        self.name = name
        self.flags = flags

    def __repr__(self) -> str:
        return "Link(%d, %r, 0x%x)" % (self.index, self.name, self.flags)


class Addr:
    """An address: the interface's index, family, prefix length, scope, IFA_F_* flags, and the
    address as 4 or 16 bytes."""

    __slots__ = ("index", "family", "prefixlen", "scope", "flags", "address")

    def __init__(
        self, index: int, family: int, prefixlen: int, scope: int, flags: int, address: bytes
    ) -> None:
        self.index = index
        self.family = family
        self.prefixlen = prefixlen
        self.scope = scope
        self.flags = flags
        self.address = address

    def __repr__(self) -> str:
        return "Addr(%d, %d, %r/%d)" % (self.index, self.family, self.address, self.prefixlen)


def _align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message in ``data``, as one recv() returns them."""
    offset = 0
    end = len(data)
    while offset + NLMSGHDR.size <= end:
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > end:
            return  # cut short or nonsense: nothing after it can be trusted
        yield kind, flags, seq, data[offset + NLMSGHDR.size : offset + length]
        offset += _align(length)


def attributes(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the route attributes from ``offset`` on."""
    end = len(data)
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            return
        # The top bits are the NLA_F_NESTED and NLA_F_NET_BYTEORDER flags, not the type.
        yield kind & 0x3FFF, data[offset + RTATTR.size : offset + length]
        offset += _align(length)


def parse_link(payload: bytes) -> Link | None:
    """The interface of an RTM_NEWLINK or RTM_DELLINK payload; None without a usable one."""
    if len(payload) < IFINFOMSG.size:
        return None
    _, _, index, flags, _ = IFINFOMSG.unpack_from(payload)
    name = b""
    for kind, value in attributes(payload, IFINFOMSG.size):
        if kind == IFLA_IFNAME:
            name = value.split(b"\0", 1)[0]
    if not name:
        return None
    return Link(index, name, flags)


def parse_addr(payload: bytes) -> Addr | None:
    """The address of an RTM_NEWADDR or RTM_DELADDR payload; None without a usable one.

    For IPv4 the interface's own address is IFA_LOCAL (IFA_ADDRESS is the peer's on a
    point-to-point link); IPv6 sends IFA_ADDRESS alone unless there is a peer."""
    if len(payload) < IFADDRMSG.size:
        return None
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(payload)
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    if size is None:
        return None
    local = address = None
    for kind, value in attributes(payload, IFADDRMSG.size):
        if kind == IFA_LOCAL:
            local = value
        elif kind == IFA_ADDRESS:
            address = value
        elif kind == IFA_FLAGS and len(value) >= 4:
            flags = struct.unpack_from("=I", value)[0]  # the full 32 bits of flags
    chosen = local if local is not None else address
    if chosen is None or len(chosen) != size or prefixlen > size * 8:
        return None
    return Addr(index, family, prefixlen, scope, flags, chosen)


def dump_request(kind: int, seq: int) -> bytes:
    """A request to dump every link (RTM_GETLINK) or address (RTM_GETADDR) of every family."""
    body = IFINFOMSG.pack(0, 0, 0, 0, 0) if kind == RTM_GETLINK else IFADDRMSG.pack(0, 0, 0, 0, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def open_events() -> socket.socket:
    """A non-blocking socket subscribed to link and address changes; OSError when the kernel or
    a sandbox refuses it."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    try:
        sock.bind((0, EVENT_GROUPS))
    except OSError:
        sock.close()
        raise
    return sock


def drain(sock: socket.socket) -> int:
    """Read every pending event; return how many messages there were (the content does not
    matter, see the module's docstring). A full receive buffer (ENOBUFS: events were lost)
    counts as one: something changed."""
    count = 0
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return count
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                count += 1
                continue
            raise
        if not data:
            return count
        count += sum(1 for _ in messages(data))


def _dump(sock: socket.socket, kind: int, seq: int) -> list[tuple[int, bytes]]:
    sock.sendto(dump_request(kind, seq), (0, 0))
    out: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(RECV_SIZE)
        if not data:
            raise NetlinkError(errno.EIO, "netlink dump ended early")
        for msg_kind, _, msg_seq, payload in messages(data):
            if msg_seq != seq:
                continue
            if msg_kind == NLMSG_DONE:
                return out
            if msg_kind == NLMSG_ERROR:
                code = -_ERRNO.unpack_from(payload)[0] if len(payload) >= 4 else errno.EIO
                if code == 0:
                    continue  # an acknowledgement, not an error
                raise NetlinkError(code, os.strerror(code))
            out.append((msg_kind, payload))


def snapshot() -> tuple[list[Link], list[Addr]]:
    """Every interface and every address, as the kernel has them now; OSError on failure."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    try:
        sock.settimeout(DUMP_TIMEOUT)
        sock.bind((0, 0))
        links = [parse_link(p) for k, p in _dump(sock, RTM_GETLINK, 1) if k == RTM_NEWLINK]
        addrs = [parse_addr(p) for k, p in _dump(sock, RTM_GETADDR, 2) if k == RTM_NEWADDR]
    finally:
        sock.close()
    return [x for x in links if x is not None], [a for a in addrs if a is not None]
