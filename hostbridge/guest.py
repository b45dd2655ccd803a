"""One guest as the bridge holds it: its link and the parts that use the link, wired together.

    Session      the channel, the protocol, the state, the requests (hostbridge.session)
    Delivery     the outbox, delivered in order, exactly once (hostbridge.delivery)
    MirrorSync   the copy of the guest's keys, kept in step (hostbridge.mirrorsync)
    Keepalive    a ping when a synced guest goes silent (hostbridge.keepalive)

The parts import the session and use its request(); the session imports none of them and tells
this owner what happens on the link through its callbacks, which are wired here and only here.
Persistence is here too: the store row the guest was created from, and flush().
"""

from __future__ import annotations

from ovmproto.handshake import HelloResult

from .channels import Channel
from .config import Limits
from .delivery import Delivery
from .keepalive import Keepalive
from .mirror import Mirror
from .mirrorsync import MirrorSync
from .session import Session, State
from .store import MirrorRow, Store
from .tasks import TaskSet


class Guest:
    def __init__(
        self,
        name: str,
        store: Store,
        limits: Limits,
        channel_spec: str | None = None,
        source: str | None = None,
    ) -> None:
        row = store.vm(name, channel_spec, source)
        self.name = name
        self.store = store
        self.channel_spec = channel_spec or row.channel or ""
        self.source = source or row.source or "config"
        self.session = Session(name, limits, row.epoch)
        self.session.last_seen = row.last_seen
        self.tasks = TaskSet("vm:" + name, self.session.log)
        self.mirror = Mirror(limits.mirror_keys, limits.mirror_bytes, store.hidden(name))
        dropped = self.mirror.load(store.mirror(name), row.gid, row.gseq)
        if dropped:
            self.session.counters["refused_keys"] += dropped
            self.session.log.warning(
                "dropped %d stored keys the protocol forbids (control characters)", dropped
            )
        self.delivery = Delivery(
            self.session, store, self.mirror, row.epoch, limits.delivery_timeout, self.tasks
        )
        self.mirror_sync = MirrorSync(self.session, self.mirror, self.tasks)
        self.keepalive = Keepalive(self.session, limits.keepalive, self.tasks)
        self._flushed_seen: float | None = row.last_seen
        self.session.on_synced = self._on_synced
        self.session.on_changed = self.mirror_sync.on_changed
        self.session.on_link_down = self._on_link_down
        self.mirror_sync.on_refreshed = self.flush

    def _on_synced(self, result: HelloResult) -> None:
        self.delivery.on_synced(result)
        self.mirror_sync.on_synced(result)
        self.keepalive.start()

    def _on_link_down(self) -> None:
        self.keepalive.stop()
        self.delivery.on_link_down()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the outbox delivery (needs a running loop); attach() adds a channel."""
        self.delivery.start()

    def attach(self, channel: Channel, source: str | None = None) -> None:
        """Talk to the guest over ``channel`` (the guest must have none)."""
        self.session.attach(channel)
        self.channel_spec = channel.spec
        self.source = source or self.source
        self.store.vm(self.name, channel.spec, self.source)

    async def detach(self) -> None:
        """Drop the channel (the VM stopped); outbox and mirror stay."""
        await self.session.detach()

    async def stop(self) -> None:
        await self.session.detach()
        await self.tasks.cancel_all()
        self.flush()

    # -- state for the bridge -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def outstanding(self) -> int:
        """Live requests and senders waiting for an acknowledgement (bounded per VM)."""
        return self.session.outstanding + self.delivery.waiting

    def flush(self) -> None:
        """Persist mirror changes and last_seen (called every second or so by the bridge)."""
        last_seen = self.session.last_seen
        if not self.mirror.dirty and last_seen == self._flushed_seen:
            return
        rows, deleted, unhidden, replace = self.mirror.take_dirty()
        self.store.save_mirror(
            self.name,
            [MirrorRow(k, e.value, e.ts, e.origin, e.hidden) for k, e in rows],
            deleted,
            replace,
            last_seen,
            self.mirror.gid,
            self.mirror.gseq,
            unhidden,
        )
        self._flushed_seen = last_seen
