"""Keeps the guest facts (guestagent.facts) current in the cache, inside the agent's epoll loop.

When they are looked at again:
- at start;
- after a netlink event on a link or an address (a socket on the kernel's multicast groups,
  registered in the loop: nothing polls), DEBOUNCE seconds after the first event of a burst, so
  that a burst (an interface brought up with its addresses) is written once;
- after someone else deleted a fact (``ovmd -r``, ``ovmd -x``, a host ``del``): the facts are the
  agent's own, so it writes them again.
Each time the host name (uname), /etc/os-release and a netlink dump of every interface and
address are read, and only the keys whose value changed are written (one stored change), so a
quiet guest's journal does not grow.

A netlink failure never stops the agent: one warning, and the interface keys stay as they were
(the other facts are still kept current at the moments above).

Turned off (``facts = no``), the agent deletes the fact keys it finds at start and watches nothing.
"""

from __future__ import annotations

import logging
import os

from ovmproto.errors import OvmError
from ovmproto.messages import OP_CLEAR, OP_DEL
from ovmsys.ratelimit import RateLimitedLog

from . import __version__, facts, netlink
from .loop import ERR, HUP, IN, Loop, Timer

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence

    from ovmproto.messages import Changed

    from .service import Service

log = logging.getLogger(__name__)

DEBOUNCE = 0.2  # seconds from the first event of a burst to the write


def read_os_release(paths: Sequence[str] = facts.OS_RELEASE_PATHS) -> dict[str, str] | None:
    """The assignments of the first os-release file that exists; None when there is none.
    OSError when one exists but cannot be read."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read(facts.OS_RELEASE_MAX)
        except FileNotFoundError:
            continue
        return facts.parse_os_release(raw.decode("utf-8", "replace"))
    return None


def hostname() -> str:
    return os.uname().nodename


class FactWatch:
    """Publishes the facts through ``service`` and keeps them current (see the module)."""

    def __init__(
        self,
        loop: Loop,
        service: Service,
        enabled: bool = True,
        debounce: float = DEBOUNCE,
        snapshot: Callable[[], tuple[list[netlink.Link], list[netlink.Addr]]] = netlink.snapshot,
        os_release_paths: Sequence[str] = facts.OS_RELEASE_PATHS,
    ) -> None:
        self.loop = loop
        self.service = service
        self.enabled = enabled
        self.debounce = debounce
        self._snapshot = snapshot
        self._os_release_paths = os_release_paths
        self._sock: socket.socket | None = None
        self._timer: Timer | None = None
        self._publishing = False  # our own change is being announced: not someone else's delete
        self._netlink_ok = True  # False after the one warning about a failing netlink
        self._warn = RateLimitedLog(log, 600.0)

    def start(self) -> None:
        if not self.enabled:
            self._remove_all()
            return
        self.service.add_listener(self._on_change)
        try:
            self._sock = netlink.open_events()
        except OSError as e:
            self._netlink_failed("cannot watch the interfaces through netlink", e)
        else:
            self.loop.add(self._sock.fileno(), IN, self._on_events)
        self.publish()

    def close(self) -> None:
        self.loop.cancel(self._timer)
        self._timer = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self.loop.remove(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _netlink_failed(self, what: str, err: OSError) -> None:
        if self._netlink_ok:
            self._netlink_ok = False
            log.warning(
                "%s: %s; the guest facts' addresses stay as they are", what, err.strerror or err
            )

    # -- triggers -----------------------------------------------------------------------------

    def _on_events(self, events: int) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            count = netlink.drain(sock)
        except OSError as e:
            self._netlink_failed("the netlink socket failed", e)
            self._close_socket()
            return
        if count or events & (HUP | ERR):
            self._schedule()

    def _on_change(self, change: Changed) -> None:
        """A listener of the service: a fact deleted by someone else is written again."""
        if self._publishing:
            return
        if change.op == OP_CLEAR or (
            change.op == OP_DEL and change.key is not None and facts.is_fact(change.key)
        ):
            self._schedule()

    def _schedule(self) -> None:
        # From the first event of a burst: a steady stream of events still writes every DEBOUNCE.
        if self._timer is None:
            self._timer = self.loop.call_later(self.debounce, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.publish()

    # -- writing ------------------------------------------------------------------------------

    def _current(self) -> dict[str, str]:
        return {e.key: e.value for e in self.service.entries() if facts.is_fact(e.key)}

    def _net(self) -> dict[str, str] | None:
        try:
            links, addrs = self._snapshot()
        except OSError as e:
            self._netlink_failed("cannot read the interfaces through netlink", e)
            return None
        return facts.net_facts(links, addrs)

    def publish(self) -> None:
        """Look at the facts now; write the keys whose value changed."""
        net = self._net()
        current = self._current()
        try:
            release = read_os_release(self._os_release_paths)
        except OSError as e:
            # Unreadable is not absent: what was published stays.
            self._warn.warn("os-release", "cannot read os-release: %s", e.strerror or e)
            release = {}
            unread = True
        else:
            unread = False
        wanted = facts.facts(hostname(), release, __version__, net)
        if unread:
            wanted.update(
                {k: current[k] for k in (facts.OS_NAME, facts.OS_VERSION) if k in current}
            )
        sets, deletes = facts.changes(current, wanted, keep_net=net is None)
        self._write(sets, deletes)

    def _remove_all(self) -> None:
        self._write([], list(self._current()))

    def _write(self, sets: list[list[str]], deletes: list[str]) -> None:
        if not sets and not deletes:
            return
        self._publishing = True
        try:
            self.service.publish(sets, deletes)
        except OvmError as e:
            # A full cache (quota) or a failing disk: the facts wait for the next occasion.
            self._warn.warn("write", "cannot write the guest facts: %s", e.message)
            return
        finally:
            self._publishing = False
        self._warn.reset("write")
        log.debug("guest facts: %d set, %d deleted", len(sets), len(deletes))
