"""hostbridge.mirrorsync: the copy of a guest's keys, kept in step with a scripted guest."""

import asyncio
import contextlib
import logging

import pytest

from hostbridge.config import Limits
from hostbridge.mirror import Mirror
from hostbridge.mirrorsync import MirrorSync
from hostbridge.session import State
from hostbridge.tasks import TaskSet
from ovmproto.codec import encode
from ovmproto.messages import Changed, List
from tests.hostbridge.scripted_guest import linked
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

FAST = Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0)


@contextlib.asynccontextmanager
async def mirrored(cache=None, gseq=0, mirror=None):
    """A MirrorSync on a live link to a guest holding ``cache`` at change counter ``gseq``."""
    async with linked(FAST) as (guest, session):
        guest.cache, guest.gseq = dict(cache or {}), gseq
        tasks = TaskSet("vm", logging.getLogger("test"))
        sync = MirrorSync(session, mirror or Mirror(100, 100000), tasks)
        session.on_synced = sync.on_synced
        session.on_changed = sync.on_changed
        try:
            yield guest, session, sync
        finally:
            await tasks.cancel_all()


def values(mirror):
    return {k: e.value for k, e in mirror.entries.items()}


def run(coro):
    return asyncio.run(coro)


def test_a_new_guest_cache_should_be_listed_into_the_mirror():
    async def main():
        async with mirrored({"a": "1", "b": "2"}, gseq=2) as (guest, _, sync):
            await async_wait_for(lambda: sync.mirror.gseq == 2, what="the listing")
            assert values(sync.mirror) == {"a": "1", "b": "2"}
            assert sync.mirror.gid == guest.gid and not sync.refreshing

    run(main())


def test_a_mirror_already_in_step_should_not_be_listed_again():
    async def main():
        mirror = Mirror(100, 100000)
        mirror.replace([("a", "1", 1.0, "guest")], "gid-1", 4)
        async with mirrored({"a": "1"}, gseq=4, mirror=mirror) as (guest, session, _):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            await asyncio.sleep(0.1)
            assert guest.of_type(List) == []

    run(main())


def test_changes_in_sequence_should_be_applied_one_by_one():
    async def main():
        async with mirrored() as (guest, _, sync):
            await async_wait_for(lambda: sync.mirror.gseq == 0, what="the first listing")
            guest.announce("set", "a", "1")
            guest.announce("set", "b", "2")
            guest.announce("del", "a")
            await async_wait_for(lambda: sync.mirror.gseq == 3, what="three changes")
            assert values(sync.mirror) == {"b": "2"}
            assert len(guest.of_type(List)) == 1  # no gap, no listing

    run(main())


def test_a_gap_in_the_changes_should_list_the_cache_again():
    async def main():
        async with mirrored() as (guest, _, sync):
            await async_wait_for(lambda: sync.mirror.gseq == 0, what="the first listing")
            guest.cache["missed"] = "x"
            guest.gseq = 5  # four changes the host never heard of
            guest.announce("set", "seen", "y")
            await async_wait_for(lambda: sync.mirror.gseq == 6, what="the listing after the gap")
            assert values(sync.mirror) == {"missed": "x", "seen": "y"}
            assert len(guest.of_type(List)) == 2

    run(main())


def test_a_change_that_follows_the_listing_in_the_same_write_should_survive_it():
    async def main():
        async with mirrored() as (guest, _, sync):
            # The change after the listing arrives before the refresh task resumes.
            change = Changed(gseq=1, op="set", ts=1.0, origin="guest", key="late", value="v")
            guest.listing_extra = encode(change)
            await async_wait_for(
                lambda: not sync.refreshing and sync.mirror.gseq == 1, what="the late change"
            )
            assert values(sync.mirror) == {"late": "v"}

    run(main())


def test_a_change_older_than_the_mirror_should_be_ignored():
    async def main():
        async with mirrored({"a": "new"}, gseq=3) as (guest, _, sync):
            await async_wait_for(lambda: sync.mirror.gseq == 3, what="the listing")
            stale = Changed(gseq=2, op="set", ts=1.0, origin="guest", key="a", value="old")
            guest.send(encode(stale))
            guest.announce("set", "b", "2")  # gseq 4, after the stale one
            await async_wait_for(lambda: sync.mirror.gseq == 4, what="the next change")
            assert values(sync.mirror) == {"a": "new", "b": "2"}

    run(main())
