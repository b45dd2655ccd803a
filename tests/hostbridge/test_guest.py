"""hostbridge.guest: a guest's parts wired to its link, and what it keeps across a restart."""

import asyncio
import os

import pytest

from hostbridge.channels import UnixChannel
from hostbridge.config import Limits
from hostbridge.errors import LinkReset
from hostbridge.guest import Guest
from hostbridge.session import State
from hostbridge.store import MirrorRow, Store
from ovmproto.messages import Set
from tests.hostbridge.scripted_guest import ScriptedGuest
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

FAST = Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0.3)


@pytest.fixture
def place(short_dir):
    return str(short_dir)


def test_once_synced_it_should_deliver_the_outbox_and_mirror_the_guests_keys(place):
    async def main():
        store = Store(os.path.join(place, "db"))
        store.vm("vm")
        store.enqueue("vm", "host.key", "h", True)
        scripted = await ScriptedGuest(os.path.join(place, "chan")).start()
        scripted.cache, scripted.gseq = {"guest.key": "g"}, 1
        guest = Guest("vm", store, FAST, "unix:" + scripted.path, "config")
        guest.start()
        guest.attach(UnixChannel(scripted.path))
        try:
            await async_wait_for(lambda: store.queued("vm") == 0, what="delivery")
            await async_wait_for(lambda: "guest.key" in guest.mirror.entries, what="the mirror")
            assert scripted.cache["host.key"] == "h"
        finally:
            await guest.stop()
            await scripted.stop()
        # stop() saved the mirror and when the agent was last seen: a new bridge starts from it.
        again = Guest("vm", store, FAST)
        assert again.mirror.entries["guest.key"].value == "g"
        assert again.mirror.gid == scripted.gid and again.session.last_seen is not None
        assert again.channel_spec == "unix:" + scripted.path and again.source == "config"
        store.close()

    asyncio.run(main())


def test_a_lost_link_should_fail_waiting_senders_and_stop_the_keepalive(place):
    async def main():
        store = Store(os.path.join(place, "db"))
        store.vm("vm")
        scripted = await ScriptedGuest(os.path.join(place, "chan")).start()
        guest = Guest("vm", store, FAST)
        guest.start()
        guest.attach(UnixChannel(scripted.path))
        try:
            await async_wait_for(lambda: guest.state is State.SYNCED, what="sync")
            assert guest.keepalive._timer is not None
            scripted.silent = {"set"}
            row = store.enqueue("vm", "k", "v", True)
            waiter = guest.delivery.wait(row.seq)
            guest.delivery.wake()
            await async_wait_for(lambda: scripted.of_type(Set), what="the set")
            assert guest.outstanding == 2  # the delivery's request and the waiting sender
            await guest.detach()
            with pytest.raises(LinkReset):
                await waiter
            assert guest.state is State.DISCONNECTED and guest.keepalive._timer is None
            assert guest.outstanding == 0
        finally:
            await guest.stop()
            await scripted.stop()
            store.close()

    asyncio.run(main())


def test_flush_should_write_only_when_something_changed(place):
    async def main():
        store = Store(os.path.join(place, "db"))
        guest = Guest("vm", store, FAST)
        writes = []
        real = store.save_mirror
        store.save_mirror = lambda *a, **k: (writes.append(a), real(*a, **k))
        guest.flush()
        assert writes == []
        guest.mirror.apply("set", "k", "v", 1.0, "guest")
        guest.flush()
        guest.flush()
        assert len(writes) == 1
        store.close()

    asyncio.run(main())


def test_keys_the_protocol_forbids_left_in_an_old_database_should_be_dropped_at_load(place):
    store = Store(os.path.join(place, "db"))
    store.vm("vm")
    rows = [
        MirrorRow("ok.key", "v", 1.0, "guest", False),
        MirrorRow("esc\x1bkey", "v", 1.0, "guest", False),
    ]
    store.save_mirror("vm", rows, [], False, None, "gid", 2)
    guest = Guest("vm", store, FAST, "unix:/nonexistent", "config")
    assert sorted(guest.mirror.entries) == ["ok.key"]
    assert guest.session.counters["refused_keys"] == 1
    guest.flush()
    assert [r.key for r in store.mirror("vm")] == ["ok.key"]
