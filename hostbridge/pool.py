"""This bridge's part in a pool of hosts sharing one PostgreSQL store (docs/pool.md).

    pool = Pool(host, store, key, config)
    await pool.start()          # registers the host, listens, heartbeats
    pool.route("web1")          # None: serve here; else the owner's URL to forward to
    pool.on_lifecycle(event)    # the migration handoff, from libvirt's lifecycle events

What it decides, and why:

- Ownership. A VM's outbox is delivered by the one host whose claim holds the VM's current fencing
  number (hostbridge.pgstore checks it in every delivery transaction). A host claims a VM when it
  attaches its channel, and claims it by force at RESUMED_MIGRATED: libvirt says the VM runs here
  now, so whoever held it before cannot reach it any more. The loser learns it from the placement
  notification at once, or at its next fenced write at the latest.
- Migration. The source stops delivering at SUSPENDED_MIGRATED (in memory, before anything else
  can be written to the paused guest), and forgets the VM at STOPPED_MIGRATED. The destination
  does not connect to the incoming VM's channel while it is paused (its run state is
  "migrating"): the source still talks to the guest then, and two hellos in one stream would
  resynchronize each other. It connects at RESUMED_MIGRATED, once its claim is in.
- Wake-ups come by LISTEN/NOTIFY (hostbridge.pglisten): an enqueue by another bridge wakes the
  owner's delivery; a claim or release updates every bridge's view of the placements. Nothing
  polls; a heartbeat every lease/3 seconds keeps this host alive and releases dead hosts' VMs.
- Answers. A request for a VM another live host owns is forwarded to it (hostbridge.forward);
  for a VM nobody live owns, the bridge answers from the shared database (queued, or stale).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from ovmsys.ratelimit import RateLimitedLog

from . import errors
from .config import Config
from .events import EventHub
from .lifecycle import LifecycleEvent

if TYPE_CHECKING:
    from .forward import Forwarder
    from .guest import Guest
    from .pgstore import HostRow, PgStore, Placement
    from .poolkey import PoolKey

log = logging.getLogger(__name__)

# How long an owner whose API did not accept a connection is not tried again: a host that is down
# must not cost every request a connect timeout.
OWNER_DOWN_PAUSE = 2.0


def _order(host: str | None, fence: int) -> tuple[int, bool]:
    """Which of two placements of one VM is newer: a claim raises the fence, and a release keeps
    the fence of the claim it ends, so at one fence the release is the later."""
    return fence, host is None


class PoolHost(Protocol):
    """What the pool needs of the bridge it belongs to (hostbridge.bridge.Bridge)."""

    lifecycle: Any  # hostbridge.lifecycle.Lifecycle, or None without libvirt
    events: EventHub  # the change stream: where a VM's host changing is told

    def local_guest(self, name: str) -> Guest | None: ...
    def attach_found(self, name: str, path: str) -> None: ...
    async def forget_guest(self, name: str) -> None: ...
    def run_state(self, name: str) -> str: ...
    def rescan(self) -> None: ...


def open_store(config: Config) -> tuple[PgStore, PoolKey]:
    """The pool's store and key, as configured; ConfigError / StoreUnavailable (one line)."""
    # Imported here: psycopg and cryptography are needed by pool bridges only.
    from .pgstore import PgStore
    from .poolkey import PoolKey

    assert config.store_url is not None and config.pool.key_file is not None  # Config.check()
    key = PoolKey.load(config.pool.key_file)
    limits = config.limits
    store = PgStore(
        config.store_url,
        config.pool.host_name(),
        key,
        audit_keep=limits.audit_rows,
        idempotency_keep=limits.idempotency_keys,
        idempotency_ttl=limits.idempotency_ttl,
    )
    return store, key


class Pool:
    def __init__(self, bridge: PoolHost, store: PgStore, key: PoolKey, config: Config) -> None:
        self.bridge = bridge
        self.store = store
        self.key = key
        self.host = config.pool.host_name()
        self.url = config.pool_url()
        self.lease = config.pool.lease
        assert config.store_url is not None  # a pool has one
        self.store_url = config.store_url
        self.ca_file = config.pool.ca_file
        self.placements: dict[str, Placement] = {}
        self._read_once = False  # the placements were read at start (refresh())
        self.hosts: dict[str, HostRow] = {}
        # Channels found for VMs migrating in (paused here): attached at RESUMED_MIGRATED.
        self.deferred: dict[str, str] = {}
        # VMs whose channel is here but whose claim failed (another live host holds them):
        # claimed again at each heartbeat and when their placement is released.
        self.unclaimed: set[str] = set()
        self._owner_down: dict[str, float] = {}  # owner URL -> monotonic time to try it again
        self._task: asyncio.Task[None] | None = None
        self._listener: object | None = None
        self._warn = RateLimitedLog(log, 30.0)
        # Since when this host's heartbeats have been succeeding (monotonic; None: the last one
        # failed). Dead hosts are released only after a whole lease of it: after an outage of
        # the database every host's heartbeat is old, and none of them is dead.
        self._beating_since: float | None = None
        self.forwarder: Forwarder | None = None

    # -- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        from .forward import Forwarder
        from .pglisten import Listener
        from .pgstore import PLACEMENT_CHANNEL, channel_for_host

        self.store.register_host(self.url, self.lease)
        # Listen first, then read: a claim committed between the read and the LISTEN would be
        # neither in the read nor heard of, and this bridge would not know the VM until it
        # restarts. The other way round, a claim may be both read and heard; _placed() keeps
        # whichever is newer.
        listener = Listener(
            self.store_url,
            [PLACEMENT_CHANNEL, channel_for_host(self.host)],
            self._notified,
            self._reconnected,
        )
        await listener.start()
        self._listener = listener
        self.refresh()
        self.forwarder = Forwarder(self.key.api_token(), self.ca_file, self.host)
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="pool-heartbeat")
        log.info(
            "pool host %s (%s): %d VMs in the pool, %d hosts",
            self.host,
            self.url,
            len(self.placements),
            len(self.hosts),
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()  # type: ignore[attr-defined]
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is not None:
            await forwarder.close()

    # -- what the pool knows ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the placements and hosts again (at start, and after the listening connection was
        lost: notifications sent meanwhile are lost)."""
        before, self.placements = self.placements, self.store.placements()
        self.refresh_hosts()
        if self._read_once:  # not at start: what changed unheard is told now
            for name, p in self.placements.items():
                old = before.get(name)
                if old is None or old.host != p.host:
                    self._announce(name, p.host)
        self._read_once = True

    def _announce(self, name: str, host: str | None) -> None:
        """Tell the change stream that ``host`` (None: nobody) now delivers VM ``name``'s
        messages: a page showing the pool follows VMs between hosts as they move."""
        self.bridge.events.publish("vm.placed", vm=name, host=host)

    def refresh_hosts(self) -> None:
        """Read the hosts (their URLs and whether they are alive) again: each heartbeat. The
        placements between two full reads come from the placement notifications, so a heartbeat
        costs H rows, not every VM of the pool (docs/fleet.md)."""
        self.hosts = {h.host: h for h in self.store.hosts()}

    def owner(self, name: str) -> str | None:
        """The host that owns VM ``name`` as last heard (None: nobody)."""
        p = self.placements.get(name)
        return None if p is None else p.host

    def owned_here(self, name: str) -> bool:
        return self.owner(name) == self.host

    def route(self, name: str, forwarded: bool = False) -> str | None:
        """The URL of the owner to forward a request for ``name`` to; None: answer here (this
        host owns or runs it, nobody live owns it, the owner is down, or the request was
        forwarded already: a pool never forwards twice)."""
        if forwarded or self.bridge.local_guest(name) is not None:
            return None
        p = self.placements.get(name)
        if p is None or p.host is None or p.host == self.host:
            return None
        if p.host not in self.hosts:
            try:
                self.refresh_hosts()  # a host that joined since the last heartbeat
            except errors.StoreError:
                return None
        h = self.hosts.get(p.host)
        if h is None or not h.alive or not h.url:
            return None
        until = self._owner_down.get(h.url)
        if until is not None and time.monotonic() < until:
            return None
        return h.url

    def owner_down(self, url: str) -> None:
        """The owner at ``url`` refused or did not take a connection: answer here for a while."""
        self._owner_down[url] = time.monotonic() + OWNER_DOWN_PAUSE
        self._warn.warn("down:" + url, "pool host %s does not answer; answering from here", url)

    # -- claims ---------------------------------------------------------------------------------

    def claim(self, name: str, force: bool = False) -> bool:
        """Claim VM ``name`` for this host (docs/pool.md); True when it is ours now."""
        try:
            fence = self.store.claim(name, force=force)
        except errors.StoreError as e:
            self.unclaimed.add(name)
            self._warn.warn("claim:" + name, "cannot claim VM %r: %s", name, e.message)
            return False
        if fence is None:
            if name not in self.unclaimed:
                log.warning(
                    "VM %r runs here but host %s owns it and is alive; not delivering to it "
                    "(two VMs with one name?)",
                    name,
                    self.owner(name),
                )
            self.unclaimed.add(name)
            return False
        self.unclaimed.discard(name)
        self._placed(name, self.host, fence)
        log.info("VM %r: claimed (fence %d%s)", name, fence, ", forced" if force else "")
        g = self.bridge.local_guest(name)
        if g is not None:
            g.delivery.resume()
        return True

    def attached(self, name: str) -> None:
        """VM ``name``'s channel was attached here: claim it unless it is migrating in, or held
        already (claimed at RESUMED_MIGRATED before its channel was found)."""
        if self.bridge.run_state(name) != "migrating" and self.store.held(name) is None:
            self.claim(name)

    def defer(self, name: str, path: str) -> bool:
        """Whether to leave the channel ``path`` of VM ``name`` alone for now: the VM is paused
        here for an incoming migration (attached at RESUMED_MIGRATED), or libvirt has not told
        of it yet (QEMU makes the channel's socket before libvirt's STARTED event: attached at
        the first event that says it runs)."""
        if self.bridge.local_guest(name) is not None:
            return False
        state = self.bridge.run_state(name)
        lifecycle = self.bridge.lifecycle
        # "shutoff"/"crashed" with a channel: a scan older than the VM's end (an incoming
        # migration that failed here while the scan resolved names).
        untold = state in ("unknown", "shutoff", "crashed")
        if state != "migrating" and not (untold and lifecycle is not None and lifecycle.connected):
            return False
        if self.deferred.get(name) != path:
            log.info("VM %r: migrating in; its channel is connected once it runs here", name)
        self.deferred[name] = path
        return True

    def _placed(self, name: str, host: str | None, fence: int) -> bool:
        """Record that ``host`` (None: nobody) holds VM ``name`` at ``fence``; False when what is
        known is newer (a notification that arrives after a read that already saw a later claim
        or release)."""
        p = self.placements.get(name)
        if p is not None and _order(host, fence) < _order(p.host, p.fence):
            return False
        known = self.hosts.get(host) if host is not None else None
        if host is not None and (known is None or not known.alive):
            # A host that joined the pool, or came back, since the last heartbeat: it claims,
            # so it lives; its URL and heartbeat, now (H rows).
            try:
                self.refresh_hosts()
            except errors.StoreError as e:
                log.warning("pool: cannot read the hosts: %s", e.message)
        if p is not None:
            if p.host != host:
                self._announce(name, host)
            p.host, p.fence = host, fence
            return True
        self._announce(name, host)
        # A VM new to the pool: added alone (re-reading every placement for it would cost the
        # whole table per bridge per new VM: docs/fleet.md).
        from .pgstore import Placement

        owner = self.hosts.get(host) if host is not None else None
        self.placements[name] = Placement(
            vm=name,
            host=host,
            fence=fence,
            state="running" if host else "released",
            since=time.time(),
            url=None if owner is None else owner.url,
            alive=host is not None,
        )
        return True

    # -- libvirt's lifecycle events -------------------------------------------------------------

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        name, detail = ev.name, ev.detail
        g = self.bridge.local_guest(name)
        if detail == "SUSPENDED_MIGRATED":
            if g is not None:
                g.delivery.pause()
                log.info("VM %r: migrating away; delivery stopped", name)
                try:
                    self.store.mark_migrating(name)
                except errors.StoreError as e:
                    log.warning("VM %r: cannot mark it migrating: %s", name, e.message)
        elif detail == "RESUMED_MIGRATED":
            # The VM runs here now: a migration ended here, or one away from here failed.
            self.claim(name, force=True)
            path = self.deferred.pop(name, None)
            if path is not None:
                self.bridge.attach_found(name, path)
            elif g is None:
                self.bridge.rescan()
        elif detail == "STOPPED_MIGRATED":
            self.deferred.pop(name, None)
            self.unclaimed.discard(name)
            try:
                self.store.release(name)
            except errors.StoreError as e:
                log.warning("VM %r: cannot release it: %s", name, e.message)
            asyncio.get_running_loop().create_task(self.bridge.forget_guest(name))
        elif ev.state == "running":
            path = self.deferred.pop(name, None)
            if path is not None:  # running here for another reason than a migration's end
                self.claim(name)
                self.bridge.attach_found(name, path)
            elif g is not None and g.delivery.paused:
                # A migration away failed (libvirt resumed it here): the VM is ours again.
                self.claim(name, force=True)
            elif g is not None and self.store.held(name) is None:
                self.claim(name)
        elif ev.state in ("shutoff", "crashed") and name in self.deferred:
            del self.deferred[name]  # an incoming migration failed here

    # -- notifications --------------------------------------------------------------------------

    def _notified(self, channel: str, payload: str) -> None:
        from .pgstore import PLACEMENT_CHANNEL

        if channel != PLACEMENT_CHANNEL:
            g = self.bridge.local_guest(payload)  # an enqueue elsewhere for a VM we deliver
            if g is not None:
                g.delivery.wake()
            return
        parts = payload.split(" ")
        if len(parts) != 3 or not parts[2].isdigit():
            return
        name, host, fence = parts[0], (None if parts[1] == "-" else parts[1]), int(parts[2])
        if not self._placed(name, host, fence):
            return  # older than what was read since
        held = self.store.held(name)
        g = self.bridge.local_guest(name)
        if host is None and g is not None and g.session.channel is not None:
            # Released while it runs here (this host was taken for dead, e.g. after an outage
            # of the database longer than the lease): claim it back.
            self.claim(name)
        elif host != self.host and held is not None and fence >= held:
            self.store.forget(name)
            log.info("VM %r: now owned by %s; this host stops delivering to it", name, host)

    def _reconnected(self) -> None:
        # Notifications sent while the listening connection was down are lost: look again.
        try:
            self.refresh()
        except errors.StoreError as e:
            log.warning("pool: cannot read the placements: %s", e.message)
            return
        for name in list(self.unclaimed):
            self.claim(name)
        for name, p in self.placements.items():
            g = self.bridge.local_guest(name)
            if g is not None and p.host == self.host:
                g.delivery.wake()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                self.store.heartbeat()
                now = time.monotonic()
                if self._beating_since is None:
                    self._beating_since = now
                elif now - self._beating_since > self.lease:
                    for name in self.store.release_dead():
                        log.info("VM %r: released (its host stopped heartbeating)", name)
                self.refresh_hosts()
            except errors.StoreError as e:
                self._beating_since = None
                self._warn.warn("beat", "pool heartbeat failed: %s", e.message)
                continue
            for name in list(self.unclaimed):
                if self.bridge.local_guest(name) is None:
                    self.unclaimed.discard(name)
                else:
                    self.claim(name)
