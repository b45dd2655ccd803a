"""hostbridge.keepalive: a silent synced guest is pinged, and resynced if it stays silent."""

import asyncio
import logging

import pytest

from hostbridge.config import Limits
from hostbridge.keepalive import Keepalive
from hostbridge.session import State
from hostbridge.tasks import TaskSet
from ovmproto.messages import Ping
from tests.hostbridge.scripted_guest import linked
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


def keepalive_on(session, interval):
    tasks = TaskSet("vm", logging.getLogger("test"))
    keepalive = Keepalive(session, interval, tasks)
    session.on_synced = lambda _: keepalive.start()
    session.on_link_down = keepalive.stop
    return keepalive, tasks


def test_a_silent_guest_should_be_pinged_after_the_interval():
    async def main():
        async with linked(Limits(keepalive=0.3)) as (guest, session):
            _, tasks = keepalive_on(session, 0.3)
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            await async_wait_for(lambda: guest.of_type(Ping), what="a ping", timeout=3)
            assert session.state is State.SYNCED  # answered: still connected
            await tasks.cancel_all()

    run(main())


def test_a_guest_that_stops_answering_should_be_resynchronized():
    async def main():
        async with linked(Limits(keepalive=0.3, hello_interval=0.1)) as (guest, session):
            _, tasks = keepalive_on(session, 0.3)
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.silent = {"ping", "hello"}  # the agent in the guest has stopped
            await async_wait_for(
                lambda: session.state is State.SYNCING, what="the ping's timeout", timeout=5
            )
            assert session.counters["timeouts"] == 1
            await tasks.cancel_all()

    run(main())


def test_an_interval_of_zero_should_never_ping():
    async def main():
        async with linked(Limits(keepalive=0)) as (guest, session):
            keepalive, tasks = keepalive_on(session, 0)
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            await asyncio.sleep(0.5)
            assert guest.of_type(Ping) == [] and keepalive._timer is None
            await tasks.cancel_all()

    run(main())


def run(coro):
    return asyncio.run(coro)
