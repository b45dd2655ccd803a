"""Bridge.query in-process, against a guest played by the test over a real unix socket
(tests/hostbridge/scripted_guest.py): when the mirror of a synced agent answers, and when the
query takes a round trip to the agent instead (docs/bridge.md, "What live means").

The scripted guest answers a host's set without announcing the change (the real agent announces it
right after its ok), and can stay silent on a request type: the windows in which the mirror must
not answer, held open for as long as the test needs them.
"""

import asyncio
import contextlib

import pytest

from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits, VmSpec
from ovmproto.limits import VALUE_MAX
from ovmproto.messages import Get, List
from tests.hostbridge.scripted_guest import ScriptedGuest
from tests.support.tempdirs import short_dir
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def synced_bridge():
    with short_dir() as d:
        guest = await ScriptedGuest(str(d / "chan")).start()
        config = Config(
            vms=[VmSpec("vm1", "unix:" + guest.path, "flag")],
            db=str(d / "bridge.sqlite3"),
            discover=False,
            limits=Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0),
        )
        bridge = Bridge(config)
        await bridge.start()
        try:
            await async_wait_for(lambda: bridge.vm("vm1").agent == "connected", what="sync")
            await async_wait_for(
                lambda: bridge.guest("vm1").mirror_sync.current, what="the first refresh"
            )
            yield bridge, guest
        finally:
            await bridge.stop()
            await guest.stop()


async def announced(bridge, guest, key, value):
    """The guest sets ``key`` and announces it; wait until the mirror has it."""
    guest.announce("set", key, value)
    mirror = bridge.guest("vm1").mirror
    await async_wait_for(
        lambda: key in mirror.entries and mirror.entries[key].value == value,
        what="the announcement of %s in the mirror" % key,
    )


def gets(guest):
    return len(guest.of_type(Get))


def test_a_synced_mirror_should_answer_live_without_a_round_trip_unless_asked_fresh():
    async def main():
        async with synced_bridge() as (bridge, guest):
            await announced(bridge, guest, "k", "v1")
            got = await bridge.query("vm1", "k")
            assert (got.value, got.stale, got.origin) == ("v1", False, "guest")
            assert gets(guest) == 0
            guest.cache["k"] = "v2"  # changed, and not announced yet: the mirror lags
            assert (await bridge.query("vm1", "k")).value == "v1"
            got = await bridge.query("vm1", "k", fresh=True)
            assert (got.value, got.stale) == ("v2", False)
            assert gets(guest) == 1

    asyncio.run(main())


def test_a_key_the_mirror_does_not_hold_should_be_asked_of_the_agent():
    async def main():
        async with synced_bridge() as (bridge, guest):
            guest.cache["unannounced"] = "there"
            got = await bridge.query("vm1", "unannounced")
            assert (got.value, got.stale) == ("there", False)
            assert gets(guest) == 1

    asyncio.run(main())


def test_a_delivered_send_should_be_answered_before_the_guest_announces_it():
    async def main():
        async with synced_bridge() as (bridge, guest):
            await announced(bridge, guest, "k", "old")
            result = await bridge.send("vm1", "k", "new")
            assert result.outcome == "delivered"
            # The guest acknowledged and has not announced the change: the mirror still says
            # "old", so the query must ask the agent.
            assert bridge.guest("vm1").mirror.entries["k"].value == "old"
            got = await bridge.query("vm1", "k")
            assert (got.value, got.stale) == ("new", False)
            # Its announcement arrives: the mirror answers again, with the new value.
            before = gets(guest)
            await announced(bridge, guest, "k", "new")
            assert (await bridge.query("vm1", "k")).value == "new"
            assert gets(guest) == before

    asyncio.run(main())


def test_queries_during_a_refresh_should_be_asked_of_the_agent():
    async def main():
        async with synced_bridge() as (bridge, guest):
            await announced(bridge, guest, "k", "v1")
            guest.silent = {"list"}
            guest.gseq += 1  # a change the bridge never hears of: the next one shows a gap
            guest.cache["k"] = "v2"
            guest.announce("set", "other", "x")
            sync = bridge.guest("vm1").mirror_sync
            await async_wait_for(lambda: guest.of_type(List)[1:], what="the refresh's list")
            assert sync.refreshing
            got = await bridge.query("vm1", "k")
            assert (got.value, got.stale) == ("v2", False)
            assert gets(guest) == 1

    asyncio.run(main())


def test_a_change_the_mirror_refuses_should_not_leave_the_old_value_answering():
    async def main():
        async with synced_bridge() as (bridge, guest):
            await announced(bridge, guest, "k", "v1")
            # A value over the protocol's limit: the session refuses to mirror it.
            guest.announce("set", "k", "x" * (VALUE_MAX + 1))
            mirror = bridge.guest("vm1").mirror
            await async_wait_for(lambda: "k" not in mirror.entries, what="the refused change")
            assert bridge.vm("vm1").counters["refused_keys"] == 1
            got = await bridge.query("vm1", "k")
            assert gets(guest) == 1  # asked of the agent, not answered with the old "v1"
            assert got.value == "x" * (VALUE_MAX + 1)

    asyncio.run(main())
