"""The bridge: every known guest, discovery, and the operations the API and CLI call.

    bridge = Bridge(config)
    await bridge.start()
    await bridge.send("web1", "com.example.hostname", "web1.example.com", log=False)
    await bridge.stop()

Delivery (docs/bridge.md): send() validates, writes a durable outbox row (fsync'd) and then, if the
agent is synced, waits for the guest's ack ("delivered"); otherwise answers "queued" (or, with
queue=False, refuses and keeps nothing). The session delivers the outbox in order, exactly once
(the guest drops a seq it already applied), whenever it (re)syncs.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ovmproto import jsonlib
from ovmproto.limits import check_key, check_value
from ovmproto.messages import Get, List

from . import errors, remote
from . import facts as guest_facts
from .channels import open_channel
from .config import Config, VmSpec
from .discovery import Discovery, NameResolver
from .errors import GuestError, LinkReset
from .events import EventHub
from .groupcommit import GroupCommit, Preparable, enabled_by_environment
from .guest import Guest
from .lifecycle import DEFAULT_URI, Lifecycle, LifecycleEvent
from .mirror import Entry
from .model import (
    AuditRow,
    CancelResult,
    KeyList,
    KeyValue,
    QueueList,
    SendResult,
    VmInfo,
)
from .session import State
from .store import IdempotencyRow, OutboxRow, Store, VmRow

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
POOL_GROUP_MAX = 60  # writes a transaction on the pool's PostgreSQL (hostbridge.groupcommit)


def _check(key: str, value: str | None = None, check_val: bool = False) -> None:
    problem = check_key(key) or (check_value(value) if check_val else None)
    if problem:
        raise errors.InvalidInput(problem[1], problem[0])


def _digest(key: str, value: str, log_value: bool) -> str:
    """What a retry with the same idempotency key must ask for again. A log=no value enters by its
    size only: a hash of a secret kept on disk would let whoever reads the database test guesses
    at it (so a reuse of the key with another secret of the same size is not noticed)."""
    what: str | int = value if log_value else len(value.encode("utf-8"))
    return hashlib.sha256(jsonlib.dumps([key, what, log_value])).hexdigest()


# What a retry is told about a message whose first send was not delivered, by its audit outcome.
_NOT_DELIVERED = {"failed": "the agent refused it"}


def _from_mirror(vm: str, key: str, value: str, e: Entry, last_seen: float | None) -> KeyValue:
    """An answer from the bridge's copy (the agent is away or did not answer): stale."""
    return KeyValue(
        vm=vm, key=key, value=value, ts=e.ts, origin=e.origin, stale=True, last_seen=last_seen
    )


def _mirror_is_live(g: Guest) -> bool:
    """Whether ``g``'s mirror may answer for its agent as live: the agent is synced, the mirror
    holds every change announced on this link (hostbridge.mirrorsync), and no change a host send
    made is still to be announced (hostbridge.session, change_due). What such an answer can miss
    is a change the guest made less than one channel latency ago: docs/bridge.md."""
    s = g.session
    return s.state is State.SYNCED and not s.change_due and g.mirror_sync.current


class Bridge:
    # What makes the run-state follower: (libvirt URI, on_event) -> a Lifecycle. A test or a
    # benchmark may give its own, with the same interface, to play libvirt's events.
    lifecycle_factory: Callable[[str, Callable[[LifecycleEvent], None]], Any] = Lifecycle

    def __init__(self, config: Config) -> None:
        self.config = config
        # From start() to stop(); see the store property. In a pool, a hostbridge.pgstore.PgStore
        # with the same methods.
        self._store: Any = None
        # This bridge's part in a pool of hosts (hostbridge.pool); None on a single host.
        self.pool: Pool | None = None
        # Commits the sends (and the guests' acknowledgements) in groups: hostbridge.groupcommit.
        self._committer: GroupCommit | None = None
        # vm -> its sends waiting for their commit: outstanding like those waiting for an ack.
        self._committing: dict[str, int] = {}
        self._guests: dict[str, Guest] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_fd: int | None = None
        self._started: float | None = None
        self.discovery: Discovery | None = None
        # The VMs' run states from libvirt (hostbridge.lifecycle), when libvirt is in use.
        self.lifecycle: Lifecycle | None = None
        # The change stream (hostbridge.events): every guest publishes into it; the API serves it.
        self.events = EventHub()
        # vm -> sends refused with nothing kept (queue=false, agent away), for hostbridge.metrics.
        self.refused: dict[str, int] = {}

    @property
    def committer(self) -> GroupCommit:
        """The group committer of the send path, from start() to stop()."""
        if self._committer is None:
            raise errors.BridgeError("the bridge is not running (its database is not open)")
        return self._committer

    @property
    def store(self) -> Store:
        """The database, open from start() to stop(); BridgeError outside that time."""
        if self._store is None:
            raise errors.BridgeError("the bridge is not running (its database is not open)")
        return self._store

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def guest_count(self) -> int:
        """VMs the bridge holds (each may need a descriptor for its channel)."""
        return len(self._guests)

    async def start(self) -> None:
        limits = self.config.limits
        if self.config.pooled:
            from .pool import Pool, open_store

            self._store, key = open_store(self.config)
            self.pool = Pool(self, self._store, key, self.config)
            await self.pool.start()
        else:
            self._lock_db()
            self._store = Store(
                self.config.db,
                audit_keep=limits.audit_rows,
                idempotency_keep=limits.idempotency_keys,
                idempotency_ttl=limits.idempotency_ttl,
            )
        self._committer = GroupCommit(
            self._store,
            enabled=enabled_by_environment(),
            max_units=None if self.pool is None else POOL_GROUP_MAX,
        )
        loop = asyncio.get_running_loop()
        uri = self.config.libvirt_uri or DEFAULT_URI
        if self.config.libvirt_enabled:
            # Before any channel is attached: a pool bridge must know which VMs are migrating in.
            self.lifecycle = type(self).lifecycle_factory(uri, self._run_state_changed)
            await self.lifecycle.start()
        configured = {vm.name for vm in self.config.vms}
        # VMs we knew before (queued messages, mirrors) stay visible even while not running; in
        # a pool, those this host owned (the others are listed from the shared database).
        for row in self._store.vms():
            if row.name not in configured and (self.pool is None or self.pool.owned_here(row.name)):
                self._guest(row.name, row.channel, row.source or "discovered")
        for spec in self.config.vms:
            self._attach(spec)
        if self.config.discovery_enabled:
            self.discovery = Discovery(
                self.config.libvirt_dirs,
                self._found,
                self._lost,
                self.config.discover_interval,
                NameResolver(uri),
            )
            await self.discovery.scan_once()
            self._tasks.append(loop.create_task(self.discovery.run(), name="discovery"))
        self._tasks.append(loop.create_task(self._flush_loop(), name="flush"))
        self._started = time.time()
        where = self.config.db if self.pool is None else self._store.path
        log.info("bridge started: %d VMs, database %s", len(self._guests), where)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        if self.lifecycle is not None:
            await self.lifecycle.stop()
            self.lifecycle = None
        self.events.close()  # its streams end now, not at the API's shutdown timeout
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(g.stop() for g in self._guests.values()), return_exceptions=True)
        if self._committer is not None:
            self._committer.flush()  # what is pending is committed, and its senders answered
            self._committer = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self.pool = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        log.info("bridge stopped")

    def _lock_db(self) -> None:
        """One bridge per database: two would deliver the same outbox twice."""
        if self.config.db == ":memory:":
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.config.db)), mode=0o700, exist_ok=True)
        fd = os.open(self.config.db + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.BridgeError("another bridge is using %s" % self.config.db) from None
        self._lock_fd = fd

    def _guest(self, name: str, channel: str | None, source: str) -> Guest:
        g = self._guests.get(name)
        if g is None:
            g = Guest(name, self.store, self.config.limits, channel, source, self.events)
            if self._committer is not None:
                g.delivery.committer = self._committer
            self._guests[name] = g
            g.start()
        return g

    def _attach(self, spec: VmSpec) -> None:
        g = self._guest(spec.name, spec.channel, spec.source)
        g.attach(
            open_channel(
                spec.channel, self.config.limits.write_buffer, self.config.limits.reconnect_max
            ),
            spec.source,
        )
        if self.pool is not None:
            self.pool.attached(spec.name)

    async def _found(self, name: str, path: str) -> None:
        if any(vm.name == name or vm.path == path for vm in self.config.vms):
            return  # configured VMs win over discovered ones
        if self.pool is not None and self.pool.defer(name, path):
            return  # migrating in: attached at RESUMED_MIGRATED (hostbridge.pool)
        g = self._guests.get(name)
        if g is not None:
            await g.detach()
        self._attach(VmSpec(name, "unix:" + path, "discovered"))

    # -- what the pool asks of the bridge (hostbridge.pool.PoolHost) ------------------------------

    def local_guest(self, name: str) -> Guest | None:
        return self._guests.get(name)

    def attach_found(self, name: str, path: str) -> None:
        """Attach the channel of a VM that migrated in (its claim is made)."""
        g = self._guests.get(name)
        if g is None or g.session.channel is None:
            self._attach(VmSpec(name, "unix:" + path, "discovered"))
        elif g.channel_spec != "unix:" + path:
            asyncio.get_running_loop().create_task(self._reattach(g, path))

    async def _reattach(self, g: Guest, path: str) -> None:
        await g.detach()
        self._attach(VmSpec(g.name, "unix:" + path, "discovered"))

    async def forget_guest(self, name: str) -> None:
        """VM ``name`` left this host (migrated away): drop its link and its guest; the shared
        database keeps its outbox and mirror for its new owner."""
        g = self._guests.pop(name, None)
        if g is not None:
            await g.stop()

    def rescan(self) -> None:
        """Look for channels now (a VM started or arrived here), not at the next scan."""
        if self.discovery is not None:
            asyncio.get_running_loop().create_task(self.discovery.scan_once())

    async def _lost(self, name: str) -> None:
        g = self._guests.get(name)
        if g is not None and g.source == "discovered":
            await g.detach()

    def _run_state_changed(self, ev: LifecycleEvent) -> None:
        # Domains that are no VM of the bridge (no ovmd channel) are not announced. In a pool the
        # event goes to the pool first: a VM migrating in is only a deferred channel until
        # RESUMED_MIGRATED attaches it, and is announced then, as its source announced it.
        ours = ev.name in self._guests
        if self.pool is not None:
            ours = ours or ev.name in self.pool.deferred
            self.pool.on_lifecycle(ev)
        if ev.changed and (ours or ev.name in self._guests):
            self.events.publish("vm.state", vm=ev.name, run_state=ev.state, reason=ev.detail)

    def run_state(self, name: str) -> str:
        """VM ``name``'s run state from libvirt (hostbridge.lifecycle.RUN_STATES); "unknown"
        without libvirt, or for a VM that is no libvirt domain."""
        return "unknown" if self.lifecycle is None else self.lifecycle.state(name).state

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - (the pool's database away) the next round
                log.error("cannot save the mirrors: %s", e)
            try:
                self.expire()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.error("cannot drop expired messages: %s", e)

    def flush(self) -> None:
        """Save every VM's mirror changes and last_seen in one transaction (one fsync); a VM
        whose save fails keeps none of the others from being saved."""
        taken = [(g, g.mirror_save()) for g in list(self._guests.values())]
        saves = [(g, save) for g, save in taken if save is not None]
        if not saves:
            return
        try:
            failed = self.store.save_mirrors([save for _, save in saves])
        except Exception:
            for g, save in saves:
                g.saved(save, ok=False)  # kept for the next flush
            raise
        for g, save in saves:
            e = failed.get(g.name)
            g.saved(save, ok=e is None)
            if e is not None:
                log.error("cannot save the mirror of VM %r: %s", g.name, e)

    def guest(self, name: str) -> Guest:
        """The guest named ``name``; UnknownVm when the bridge knows none."""
        g = self._guests.get(name) if isinstance(name, str) else None
        if g is None:
            raise errors.UnknownVm(name)
        return g

    def _elsewhere(self, name: str) -> VmRow | None:
        """In a pool, the shared row of VM ``name`` when this host does not run it and answers
        for it anyway (its owner is down, or nobody owns it: hostbridge.remote); else None."""
        if self.pool is None or not isinstance(name, str) or name in self._guests:
            return None
        if name not in self.pool.placements:
            return None
        return next((row for row in self.store.vms() if row.name == name), None)

    # -- reading --------------------------------------------------------------------------------

    def vms(self, local: bool = False) -> list[VmInfo]:
        """Every VM, by name; in a pool, the whole pool's unless ``local`` (those of this host)."""
        queued = self.store.queued_counts()
        infos = [self._info(g, queued.get(name, 0)) for name, g in self._guests.items()]
        if self.pool is not None and not local:
            # The rest of the pool, from the shared database (docs/pool.md).
            pool = self.pool
            for row in self.store.vms():
                if row.name not in self._guests and row.name in pool.placements:
                    host = pool.owner(row.name)
                    alive = host is not None and host in pool.hosts and pool.hosts[host].alive
                    infos.append(remote.vm_info(row, host, alive, queued.get(row.name, 0)))
        return sorted(infos, key=lambda info: info.name)

    def check_vm(self, name: str) -> None:
        """UnknownVm unless the bridge (or, in a pool, the pool) knows VM ``name``: what vm()
        checks, without reading the database (a send's first step)."""
        if isinstance(name, str) and (
            name in self._guests or (self.pool is not None and name in self.pool.placements)
        ):
            return
        raise errors.UnknownVm(name)

    def vm(self, name: str) -> VmInfo:
        row = self._elsewhere(name)
        if row is not None:
            return next(info for info in self.vms() if info.name == name)
        g = self.guest(name)
        return self._info(g, self.store.queued(g.name))

    def _info(self, g: Guest, queued: int) -> VmInfo:
        link = g.session
        return VmInfo(
            name=g.name,
            channel=g.channel_spec,
            source=g.source,
            agent=link.state.agent,
            agent_version=link.agent_version,
            last_seen=link.last_seen,
            queued=queued,
            connected_since=link.connected_since,
            counters=dict(link.counters),
            run_state=self.run_state(g.name),
            facts=guest_facts.from_mirror(g.mirror.entries, g.mirror.fact_keys).to_json(),
            host=None if self.pool is None else self.pool.owner(g.name),
        )

    def stats(self) -> dict[str, float]:
        committer = self._committer
        return {
            "vms": len(self._guests),
            "connected": sum(1 for g in self._guests.values() if g.state is State.SYNCED),
            "uptime": 0.0 if self._started is None else time.time() - self._started,
            # Writes of the send path (sends, acknowledgements) and the transactions that held
            # them: commit_units / commits is how many writes each fsync served.
            "commits": 0 if committer is None else committer.commits,
            "commit_units": 0 if committer is None else committer.units,
            # The change stream's ring and its readers (hostbridge.events).
            **self.events.stats(),
        }

    def audit(self, name: str, *, limit: int = 100) -> list[AuditRow]:
        if self._elsewhere(name) is None:
            self.guest(name)
        return [
            AuditRow(id=r[0], vm=r[1], key=r[2], size=r[3], ts=r[4], outcome=r[5], value=r[6])
            for r in self.store.audit(name, limit)
        ]

    async def query(
        self, name: str, key: str, *, timeout: float = 5.0, fresh: bool = False
    ) -> KeyValue:
        """The key's value, live (stale=False) when the agent is synced: from the mirror, which
        then holds every change the agent announced up to the last frame read from it, or with
        a round trip to the agent when the mirror cannot tell (a refresh under way, a host
        change whose announcement is still due, a key it does not hold or whose value it kept
        off disk) or ``fresh`` asks for one (docs/bridge.md, "What live means").

        Otherwise, and also when the round trip times out or the link drops meanwhile, the
        answer comes from the mirror, marked stale=True with the time the agent was last seen.
        NotFound when neither has the key.
        """
        g = self._guests.get(name)
        if g is not None and not fresh and _mirror_is_live(g):
            e = g.mirror.entries.get(key)
            if e is not None and e.value is not None:
                # Keys in the mirror passed the same check as _check(key) below.
                return KeyValue(
                    vm=name,
                    key=key,
                    value=e.value,
                    ts=e.ts,
                    origin=e.origin,
                    stale=False,
                    last_seen=g.session.last_seen,
                )
        _check(key)
        row = self._elsewhere(name)
        if row is not None:
            return remote.query(self.store, row, key)
        g = self.guest(name)
        s = g.session
        # A VM paused to migrate away cannot answer: its mirror does, at once.
        if s.state is State.SYNCED and not g.delivery.paused:
            try:
                ok, _ = await s.request(lambda i: Get(id=i, key=key), timeout)
                return KeyValue(
                    vm=name,
                    key=key,
                    value=ok.value or "",
                    ts=float(ok.ts or 0.0),
                    origin=ok.origin or "guest",
                    stale=False,
                    last_seen=s.last_seen,
                )
            except errors.NotFound:
                raise errors.NotFound("VM %r has no key %r" % (name, key)) from None
            except (errors.AgentTimeout, errors.AgentNotConnected):
                pass  # answer from the mirror below
        e = g.mirror.entries.get(key)
        if e is None:
            raise errors.NotFound(
                "VM %r has no key %r (from the bridge's copy; the agent is "
                "not connected)" % (name, key)
            )
        if e.value is None:
            raise errors.NotFound(
                "the value of key %r in VM %r was sent with log off and is not "
                "kept on disk; the agent is not connected" % (key, name)
            )
        return _from_mirror(name, key, e.value, e, s.last_seen)

    async def keys(self, name: str, *, timeout: float = 5.0) -> KeyList:
        """Every key, live when synced: always a listing by the agent, unlike query() (listings
        are rare, and the mirror lacks the keys its quota refused). Not synced, or the listing
        timed out: from the mirror, marked stale."""
        row = self._elsewhere(name)
        if row is not None:
            return remote.keys(self.store, row)
        g = self.guest(name)
        s = g.session
        if s.state is State.SYNCED and not g.delivery.paused:
            try:
                _, items = await s.request(lambda i: List(id=i), timeout, collect=True)
                return KeyList(
                    vm=name,
                    stale=False,
                    last_seen=s.last_seen,
                    entries=[
                        KeyValue(
                            vm=name,
                            key=i.key,
                            value=i.value,
                            ts=float(i.ts),
                            origin=i.origin,
                            stale=False,
                            last_seen=s.last_seen,
                        )
                        for i in items or ()
                    ],
                )
            except (errors.AgentTimeout, errors.AgentNotConnected):
                pass
        return KeyList(
            vm=name,
            stale=True,
            last_seen=s.last_seen,
            entries=[
                _from_mirror(name, k, e.value, e, s.last_seen)
                for k, e in g.mirror.entries.items()
                if e.value is not None
            ],
        )

    # -- writing --------------------------------------------------------------------------------

    async def send(
        self,
        name: str,
        key: str,
        value: str,
        *,
        log: bool = True,
        queue: bool = True,
        timeout: float = 5.0,
        expires: float | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        """Send key=value to the VM's guest.

        "delivered": the guest acknowledged it after storing it durably. "queued": the agent is
        not connected (or did not acknowledge within ``timeout``); the message is in the durable
        outbox and will be delivered in order, exactly once. queue=False: AgentNotConnected
        instead, and nothing is kept. With log=False the value is never written to the audit,
        the logs or an error message, and leaves the database file once delivered.

        ``expires``: seconds after which it is dropped if still undelivered (0: never; None: the
        configured [limits] message_expiry). Cancelled or expired while the sender waits:
        MessageCancelled / MessageExpired.
        ``idempotency_key``: remembered with the message (same transaction); a send to the same VM
        with the same key is a retry of that message and is never applied again (_replay).
        """
        _check(key, value, check_val=True)
        if guest_facts.is_fact(key):
            # The agent would refuse it too (docs/cli.md, "Guest facts"): say so before queueing.
            raise errors.InvalidInput(guest_facts.RESERVED_MESSAGE)
        if self._elsewhere(name) is not None:
            idem = None if idempotency_key is None else (idempotency_key, _digest(key, value, log))
            return self._with_run_state(
                await self._send_elsewhere(name, key, value, log, queue, timeout, expires, idem)
            )
        g = self.guest(name)
        if idempotency_key is None:
            result = await self._submit(g, key, value, log, queue, timeout, expires)
        else:
            digest = _digest(key, value, log)
            prior = self.store.idempotent(name, idempotency_key)
            if prior is not None:
                result = await self._replay(g, name, prior, digest, key, queue, timeout)
            else:
                result = await self._submit(
                    g, key, value, log, queue, timeout, expires, (idempotency_key, digest)
                )
        return self._with_run_state(result)

    def _with_run_state(self, result: SendResult) -> SendResult:
        # A queued message to a shut-off VM waits for its next boot: the CLI says so.
        result.run_state = self.run_state(result.vm)
        return result

    async def delete(
        self, name: str, key: str, *, timeout: float = 5.0, queue: bool = True
    ) -> SendResult:
        """Delete key in the guest: a sequenced host `del`, queued like a send."""
        _check(key)
        if self._elsewhere(name) is not None:
            return self._with_run_state(
                await self._send_elsewhere(name, key, None, True, queue, timeout, None, None)
            )
        return self._with_run_state(
            await self._submit(self.guest(name), key, None, True, queue, timeout)
        )

    def _deadline(self, expires: float | None) -> float | None:
        lifetime = self.config.limits.message_expiry if expires is None else expires
        return time.time() + lifetime if lifetime > 0 else None

    async def _send_elsewhere(
        self,
        name: str,
        key: str,
        value: str | None,
        log_value: bool,
        queue: bool,
        timeout: float,
        expires: float | None,
        idempotency: tuple[str, str] | None,
    ) -> SendResult:
        """A send to a pool VM that no live host runs: queued in the shared outbox, for the VM's
        next owner (hostbridge.remote)."""
        done = await remote.send(
            self.store,
            self.committer,
            name,
            key,
            value,
            log_value,
            queue,
            self._deadline(expires),
            idempotency,
        )
        if isinstance(done, IdempotencyRow):
            assert idempotency is not None  # only then is one looked up
            return await self._replay(None, name, done, idempotency[1], key, queue, timeout)
        self.events.publish("message.queued", vm=name, seq=done.seq, key=key)
        return done

    async def _submit(
        self,
        g: Guest,
        key: str,
        value: str | None,
        log_value: bool,
        queue: bool,
        timeout: float,
        expires: float | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> SendResult:
        name = g.name
        store = self.store
        # Blocked: migrating away, or (in a pool) another host holds the VM. As for an agent
        # that is away, the message is queued (or refused), not left to time out.
        away = g.state is not State.SYNCED or g.delivery.blocked
        if not queue and away:
            await self.committer.run(lambda db: store.audit_refused(name, key, value, False))
            self.refused[name] = self.refused.get(name, 0) + 1
            raise errors.AgentNotConnected(
                "the agent in VM %r is not connected; nothing was queued" % name
            )
        outstanding = g.outstanding + self._committing.get(name, 0)
        if outstanding >= self.config.limits.max_outstanding:
            raise errors.Busy("VM %r has %d requests outstanding, the limit" % (name, outstanding))
        deadline = self._deadline(expires)

        def enqueue(db: sqlite3.Connection) -> OutboxRow | IdempotencyRow:
            if idempotency is not None:
                # send() looked before this waited for its commit; a send with the same key may
                # have been enqueued since (in this very group, even). This one is its retry.
                prior = store.idempotent(name, idempotency[0])
                if prior is not None:
                    return prior
            row = store.enqueue(
                name, key, value, log_value, expires=deadline, idempotency=idempotency
            )
            if value is not None and not log_value:
                # Before any delivery can run: the guest's announcement of the value must find
                # the key hidden. Should the commit fail, the key stays hidden for nothing, which
                # errs on the side of the secret.
                g.mirror.hide(key)
            return row

        unit: Callable[[Any], OutboxRow | IdempotencyRow] = enqueue
        prepare = getattr(store, "prepare_enqueue", None)
        if prepare is not None and idempotency is None and (value is None or log_value):
            # The pool's store commits it beside the loop, with its group (groupcommit). Not a
            # send with an idempotency key (its look-up belongs in the write's transaction)
            # nor a log=no value (sealed with its seq, known only in the transaction).
            unit = Preparable(
                enqueue, lambda: prepare(name, key, value, log_value, expires=deadline)
            )
        self._committing[name] = self._committing.get(name, 0) + 1
        try:
            done = await self.committer.run(unit)
        finally:
            left = self._committing.pop(name) - 1
            if left:
                self._committing[name] = left
        if isinstance(done, IdempotencyRow):
            assert idempotency is not None  # only then is one looked up
            return await self._replay(g, name, done, idempotency[1], key, queue, timeout)
        self.events.publish("message.queued", vm=name, seq=done.seq, key=key)
        if g.state is not State.SYNCED or g.delivery.blocked:
            if not queue:
                # The link went down while the send waited for its commit.
                raise await self._link_lost(g, done.seq)
            g.delivery.wake()
            return SendResult(vm=name, key=key, outcome="queued", seq=done.seq)
        return await self._await_ack(g, done.seq, key, queue, timeout)

    async def _link_lost(self, g: Guest, seq: int) -> errors.AgentNotConnected:
        """What a queue=False sender is told when the link to the agent went down before the
        agent acknowledged outbox row ``seq``; the row is removed when the guest cannot have it.
        """
        name = g.name
        store = self.store

        def refuse(db: sqlite3.Connection) -> bool:
            # Decided inside the commit's callback: the delivery cannot write the row between
            # this look and the commit that removes it.
            if g.delivery.was_written(seq):
                return False
            store.finish(name, [seq], "refused")
            return True

        if await self.committer.run(refuse):
            self.refused[name] = self.refused.get(name, 0) + 1
            # Its message.queued had been published: the stream learns how it ended.
            self.events.publish("message.refused", vm=name, seq=seq)
            return errors.AgentNotConnected(
                "the agent in VM %r disconnected; nothing was queued" % name
            )
        return errors.AgentNotConnected(
            "the agent in VM %r disconnected before acknowledging; "
            "the message stays queued, as it may have arrived" % name
        )

    async def _replay(
        self,
        g: Guest | None,
        name: str,
        prior: IdempotencyRow,
        digest: str,
        key: str,
        queue: bool,
        timeout: float,
    ) -> SendResult:
        """A retry of a send made with the same idempotency key: its message's outcome, never a
        second message. Still queued: wait for it as the first send would have (``g`` None: a
        pool VM this host does not run, whose message waits for its next owner)."""
        if prior.digest != digest:
            raise errors.IdempotencyKeyReused(
                "this idempotency key was used for another message to VM %r (message %d); "
                "give each new message a new key" % (name, prior.seq)
            )
        if prior.outcome == "delivered":
            return SendResult(vm=name, key=key, outcome="delivered", seq=prior.seq, replayed=True)
        if prior.outcome == "queued" and not self.store.in_outbox(name, prior.seq):
            # Removed without an outcome recorded: it is not coming, whatever removed it.
            prior.outcome = "withdrawn"
        if prior.outcome == "cancelled":
            raise errors.MessageCancelled(
                "message %d to VM %r, sent earlier with this idempotency key, was cancelled "
                "before delivery; it is not sent again" % (prior.seq, name)
            )
        if prior.outcome == "expired":
            raise errors.MessageExpired(
                "message %d to VM %r, sent earlier with this idempotency key, expired before "
                "delivery; it is not sent again" % (prior.seq, name)
            )
        if prior.outcome != "queued":
            raise errors.NotDelivered(
                "message %d to VM %r (key %r), sent earlier with this idempotency key, was not "
                "delivered: %s; it is not sent again"
                % (prior.seq, name, key, _NOT_DELIVERED.get(prior.outcome, prior.outcome))
            )
        if g is None or g.state is not State.SYNCED or g.delivery.blocked:
            if queue:
                return SendResult(vm=name, key=key, outcome="queued", seq=prior.seq, replayed=True)
            raise errors.AgentNotConnected(
                "the agent in VM %r is not connected; message %d, sent earlier with this "
                "idempotency key, stays queued" % (name, prior.seq)
            )
        if g.outstanding >= self.config.limits.max_outstanding:
            raise errors.Busy(
                "VM %r has %d requests outstanding, the limit" % (name, g.outstanding)
            )
        return await self._await_ack(g, prior.seq, key, queue, timeout, replayed=True)

    async def _await_ack(
        self, g: Guest, seq: int, key: str, queue: bool, timeout: float, replayed: bool = False
    ) -> SendResult:
        """Wait for the guest's acknowledgement of outbox row ``seq`` (the agent is synced)."""
        name = g.name
        fut = g.delivery.wait(seq)
        g.delivery.wake()
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            if queue:
                return SendResult(vm=name, key=key, outcome="queued", seq=seq, replayed=replayed)
            raise errors.AgentTimeout(
                "the agent in VM %r did not acknowledge within %.1f s; the "
                "message stays queued, as it may have arrived" % (name, timeout)
            ) from None
        except LinkReset:
            if queue:
                return SendResult(vm=name, key=key, outcome="queued", seq=seq, replayed=replayed)
            raise await self._link_lost(g, seq) from None
        except GuestError as e:
            raise GuestError(
                "the agent in VM %r refused key %r: %s" % (name, key, e.message), e.code
            ) from None
        finally:
            # Given up (timeout, or the request cancelled) or settled: it no longer counts as an
            # outstanding sender.
            g.delivery.forget(seq, fut)
        return SendResult(vm=name, key=key, outcome="delivered", seq=seq, replayed=replayed)

    # -- withdrawing ----------------------------------------------------------------------------

    def queue(self, name: str, *, limit: int = 100) -> QueueList:
        """VM ``name``'s messages waiting for delivery, oldest first, without their values."""
        if self._elsewhere(name) is not None:
            return remote.queue_list(self.store, name, limit)
        g = self.guest(name)
        return remote.queue_list(self.store, name, limit, g.delivery.was_written)

    def cancel(self, name: str, seq: int | None = None) -> CancelResult:
        """Withdraw VM ``name``'s undelivered message ``seq`` (None: all of them).

        A message not yet written to the guest is deleted (value and all) and never delivered;
        its audit row says "cancelled". One written but not acknowledged (in flight) may already
        be in the guest: its value is erased at once and it is never written again, and the
        guest's acknowledgement or next hello settles it as "delivered" or "cancelled". NotFound
        when ``seq`` is not waiting for delivery.
        """
        if self._elsewhere(name) is not None:
            return remote.cancel(self.store, name, seq)
        g = self.guest(name)
        cancelled, in_flight = g.delivery.withdraw(None if seq is None else [seq], "cancelled")
        if seq is not None and not (cancelled or in_flight):
            raise errors.NotFound(
                "VM %r has no message %d waiting for delivery (delivered, refused, cancelled, "
                "expired, or never sent)" % (name, seq)
            )
        if cancelled or in_flight:
            log.info(
                "VM %r: cancelled %d queued message(s); %d in flight",
                name,
                len(cancelled),
                len(in_flight),
            )
        return CancelResult(vm=name, cancelled=cancelled, in_flight=in_flight)

    def expire(self, now: float | None = None) -> int:
        """Withdraw every undelivered message past its expiry; return how many."""
        count = 0
        for name, seqs in self.store.expired(time.time() if now is None else now).items():
            g = self._guests.get(name)
            if g is not None:
                withdrawn, in_flight = g.delivery.withdraw(seqs, "expired")
                count += len(withdrawn) + len(in_flight)
                log.info("VM %r: %d queued message(s) expired", name, len(seqs))
        return count
