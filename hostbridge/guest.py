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

import time

from ovmproto.handshake import HelloResult
from ovmproto.messages import OP_CLEAR, OP_DEL, OP_SET, Changed

from .channels import Channel
from .config import Limits
from .delivery import Delivery
from .events import EventHub
from .keepalive import Keepalive
from .mirror import Mirror
from .mirrorsync import MirrorSync
from .session import Session, State
from .store import MirrorRow, MirrorSave, OutboxRow, Store, save_one
from .tasks import TaskSet


class Guest:
    def __init__(
        self,
        name: str,
        store: Store,
        limits: Limits,
        channel_spec: str | None = None,
        source: str | None = None,
        events: EventHub | None = None,
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
        # What happens to this guest goes to the bridge's change stream (hostbridge.events).
        self.events = events if events is not None else EventHub()
        self._agent = self.session.state.agent
        self.session.on_synced = self._on_synced
        self.session.on_changed = self._on_changed
        self.session.on_link_down = self._on_link_down
        self.session.on_state = self._on_state
        self.mirror_sync.on_refreshed = self._on_refreshed
        self.delivery.on_outcome = self._on_outcome
        self.events.publish("vm.added", vm=name)

    def _on_synced(self, result: HelloResult) -> None:
        self.delivery.on_synced(result)
        self.mirror_sync.on_synced(result)
        self.keepalive.start()

    def _on_link_down(self) -> None:
        self.keepalive.stop()
        self.delivery.on_link_down()

    # -- the change stream ----------------------------------------------------------------------

    def _on_state(self, state: State) -> None:
        agent = state.agent
        if agent != self._agent:  # syncing and disconnected are both "not connected" steps
            self._agent = agent
            self.events.publish(
                "agent.state", vm=self.name, agent=agent, agent_version=self.session.agent_version
            )

    def _on_changed(self, msg: Changed) -> None:
        self.mirror_sync.on_changed(msg)
        op, key, vm = msg.op, msg.key, self.name
        if op == OP_SET and key is not None and msg.value is not None:
            # A log=no value: the stream says it changed, never what it is. (Applied above: a
            # guest's own write of the key has unhidden it.)
            hidden = key in self.mirror.hidden
            value = {} if hidden else {"value": msg.value}
            self.events.publish(
                "key.set",
                vm=vm,
                key=key,
                origin=msg.origin,
                set_time=msg.ts,
                hidden=hidden,
                **value,
            )
        elif op == OP_DEL and key is not None:
            self.events.publish("key.deleted", vm=vm, key=key, origin=msg.origin)
        elif op == OP_CLEAR:
            self.events.publish("keys.cleared", vm=vm, origin=msg.origin)

    def _on_refreshed(self) -> None:
        self.flush()
        self.events.publish("keys.refreshed", vm=self.name)

    def _on_outcome(self, seq: int, outcome: str, row: OutboxRow | None) -> None:
        fields: dict[str, object] = {"seq": seq}
        if row is not None:
            fields["key"] = row.key
            if outcome == "delivered" and row.created:
                fields["waited"] = max(0.0, time.time() - row.created)
        self.events.publish("message." + outcome, vm=self.name, **fields)

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
        """Persist mirror changes and last_seen now (the bridge saves every VM's at once)."""
        save = self.mirror_save()
        if save is not None:
            save_one(self.store, save)
            self.saved(save)

    def mirror_save(self) -> MirrorSave | None:
        """The mirror changes and last_seen not saved yet (taken: saved() once written), or
        None when there are none."""
        last_seen = self.session.last_seen
        if not self.mirror.dirty and last_seen == self._flushed_seen:
            return None
        rows, deleted, unhidden, replace = self.mirror.take_dirty()
        return MirrorSave(
            self.name,
            [MirrorRow(k, e.value, e.ts, e.origin, e.hidden) for k, e in rows],
            deleted,
            replace,
            last_seen,
            self.mirror.gid,
            self.mirror.gseq,
            unhidden,
        )

    def saved(self, save: MirrorSave, ok: bool = True) -> None:
        """``save`` (from mirror_save()) is in the store; ``ok`` False: it is not, and the next
        mirror_save() holds it again."""
        if ok:
            self._flushed_seen = save.last_seen
        else:
            self.mirror.untake(
                [r.key for r in save.rows], save.deleted, save.unhidden, save.replace
            )
