"""hostbridge.session: one guest's link, driven against a scripted guest on a real unix socket."""

import asyncio

import pytest

from hostbridge import errors
from hostbridge.config import Limits
from hostbridge.errors import GuestError, LinkReset
from hostbridge.session import State
from ovmproto.codec import encode
from ovmproto.messages import Get, Item, List, Ok, Ping
from tests.hostbridge.scripted_guest import linked
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

FAST = Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0)


def run(coro):
    return asyncio.run(coro)


def test_it_should_sync_and_tell_its_owner_what_the_guest_said_in_its_hello():
    async def main():
        async with linked(FAST) as (guest, session):
            guest.gid, guest.gseq = "cache-7", 12
            results = []
            session.on_synced = results.append
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            assert [(r.gid, r.gseq, r.agent) for r in results] == [("cache-7", 12, "scripted 1")]
            assert session.agent_version == "scripted 1" and session.connected_since
            assert guest.hellos()[0].epoch == "epoch-1"

    run(main())


def test_it_should_repeat_an_unanswered_hello_with_a_fresh_nonce():
    async def main():
        async with linked(FAST) as (guest, session):
            guest.silent = {"hello"}
            await async_wait_for(lambda: len(guest.hellos()) >= 3, what="three hellos")
            assert session.state is State.SYNCING
            nonces = [h.nonce for h in guest.hellos()]
            assert len(set(nonces)) == len(nonces)
            guest.silent = set()
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")

    run(main())


def test_it_should_match_replies_to_requests_by_id():
    async def main():
        async with linked(FAST) as (guest, session):
            guest.cache = {"a": "1", "b": "2"}
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            replies = await asyncio.gather(
                session.request(lambda i: Get(id=i, key="b"), 5),
                session.request(lambda i: Get(id=i, key="a"), 5),
            )
            assert [ok.value for ok, _ in replies] == ["2", "1"]
            with pytest.raises(errors.NotFound):
                await session.request(lambda i: Get(id=i, key="zzz"), 5)

    run(main())


def test_it_should_collect_the_items_of_a_listing_up_to_the_mirror_quota():
    async def main():
        limits = Limits(hello_interval=0.1, keepalive=0, mirror_keys=3)
        async with linked(limits) as (guest, session):
            guest.cache = {"k%d" % i: "v" for i in range(3)}
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            _, items = await session.request(lambda i: List(id=i), 5, collect=True)
            assert [i.key for i in items] == ["k0", "k1", "k2"]
            guest.cache["k3"] = "v"
            with pytest.raises(errors.BridgeError, match="passed 3 keys"):
                await session.request(lambda i: List(id=i), 5, collect=True)

    run(main())


def test_a_timed_out_request_should_resync_the_link_and_fail_what_waits():
    async def main():
        async with linked(FAST) as (guest, session):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.silent = {"get"}
            other = asyncio.ensure_future(session.request(lambda i: Get(id=i, key="x"), 30))
            await asyncio.sleep(0.05)
            with pytest.raises(errors.AgentTimeout):
                await session.request(lambda i: Get(id=i, key="x"), 0.3)
            with pytest.raises(LinkReset):
                await other  # its reply can no longer be trusted to be its own
            assert session.counters["timeouts"] == 1
            await async_wait_for(lambda: len(guest.hellos()) == 2, what="a new hello")
            await async_wait_for(lambda: session.state is State.SYNCED, what="resync")
            assert session.counters["resyncs"] == 1

    run(main())


def test_it_should_refuse_requests_while_not_synced_and_beyond_the_outstanding_limit():
    async def main():
        limits = Limits(hello_interval=0.1, keepalive=0, max_outstanding=2)
        async with linked(limits) as (guest, session):
            guest.silent = {"hello"}
            await async_wait_for(lambda: guest.hellos(), what="a hello")
            with pytest.raises(errors.AgentNotConnected):
                await session.request(lambda i: Ping(id=i), 5)
            guest.silent = {"ping"}
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            waiting = [
                asyncio.ensure_future(session.request(lambda i: Ping(id=i), 30)) for _ in range(2)
            ]
            await asyncio.sleep(0.05)
            with pytest.raises(errors.Busy):
                await session.request(lambda i: Ping(id=i), 5)
            for w in waiting:
                w.cancel()

    run(main())


def test_it_should_hand_changes_to_its_owner_and_answer_the_guests_ping():
    async def main():
        async with linked(FAST) as (guest, session):
            changes = []
            session.on_changed = changes.append
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.announce("set", "k", "v")
            guest.send(encode(Ping(id=77)))
            await async_wait_for(lambda: changes, what="the change")
            assert (changes[0].gseq, changes[0].key) == (1, "k")
            await async_wait_for(lambda: guest.of_type(Ok), what="the answer to the ping")
            assert guest.of_type(Ok)[0].id == 77

    run(main())


def test_a_refusal_should_carry_the_guests_code():
    async def main():
        async with linked(FAST) as (guest, session):
            guest.refuse["get"] = "denied"
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            with pytest.raises(GuestError) as caught:
                await session.request(lambda i: Get(id=i, key="x"), 5)
            assert caught.value.code == "denied"

    run(main())


def test_a_lost_link_should_fail_what_waits_tell_the_owner_and_reconnect():
    async def main():
        async with linked(FAST) as (guest, session):
            downs = []
            session.on_link_down = lambda: downs.append(session.state)
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.silent = {"get"}
            waiting = asyncio.ensure_future(session.request(lambda i: Get(id=i, key="x"), 30))
            await asyncio.sleep(0.05)
            await guest.drop()
            with pytest.raises(LinkReset):
                await waiting
            assert downs and downs[0] is State.DISCONNECTED
            await async_wait_for(lambda: session.state is State.SYNCED, what="reconnect")
            assert session.counters["reconnects"] == 1 and guest.connections == 2

    run(main())


def test_a_stray_item_or_reply_should_be_dropped():
    async def main():
        async with linked(FAST) as (guest, session):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.send(
                encode(Ok(id=9999))
                + encode(Item(id=9998, key="k", value="v", ts=1.0, origin="guest"))
            )
            guest.cache["k"] = "v"
            ok, _ = await session.request(lambda i: Get(id=i, key="k"), 5)
            assert ok.value == "v"

    run(main())


def test_only_a_link_that_stayed_synced_should_reset_the_reconnect_backoff(monkeypatch):
    monkeypatch.setattr("hostbridge.session.STABLE_LINK", 0.3)

    async def main():
        async with linked(FAST) as (guest, session):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            await guest.drop()  # synced for a moment only: a failed link
            await async_wait_for(lambda: guest.connections == 2, what="reconnect")
            assert session.counters["failed_links"] == 1
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            await asyncio.sleep(0.4)  # now it has stayed up past STABLE_LINK
            await guest.drop()
            await async_wait_for(lambda: guest.connections == 3, what="reconnect")
            assert session.counters["failed_links"] == 1

    run(main())


def test_a_link_lost_while_connects_are_held_should_wait_for_them_to_be_allowed():
    async def main():
        async with linked(FAST) as (guest, session):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            session.hold_connects()  # the VM migrates away: its socket here goes with it
            await guest.drop()
            await async_wait_for(lambda: session.state is State.CONNECTING, what="link down")
            await asyncio.sleep(0.2)  # FAST reconnects within a few ms when allowed
            assert guest.connections == 1
            # A link that ends as its VM migrates away is no failed link (no warning either).
            assert session.counters["failed_links"] == 0
            session.allow_connects()  # the migration failed: the VM stays here
            await async_wait_for(lambda: session.state is State.SYNCED, what="reconnect")
            assert guest.connections == 2

    run(main())
