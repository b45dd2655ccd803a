"""hostbridge.pglisten: the pool's wake-ups arrive, and keep arriving after the database restarts
(with a call to on_reconnect, since what was sent meanwhile is lost)."""

import asyncio
import logging
import uuid

import psycopg
import pytest

from hostbridge.pglisten import Listener
from hostbridge.pgstore import PLACEMENT_CHANNEL, channel_for_host
from tests.support.waiting import async_wait_for

WAKE = channel_for_host("hv1")


@pytest.fixture
def pg_url(postgres_server):
    return postgres_server.create_database("pglisten_%s" % uuid.uuid4().hex[:12])


class Recorder:
    def __init__(self):
        self.seen = []
        self.reconnects = 0

    def notify(self, channel, payload):
        self.seen.append((channel, payload))

    def reconnected(self):
        self.reconnects += 1


def send(url, channel, payload):
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def sent(url, channel, payload):
    await asyncio.to_thread(send, url, channel, payload)


def sessions(cluster, url):
    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    return cluster.backend_pids(dbname)


def test_notifications_should_arrive_on_every_channel_listened_to(pg_url, postgres_server):
    rec = Recorder()

    async def main():
        listener = Listener(pg_url, [PLACEMENT_CHANNEL, WAKE], rec.notify, rec.reconnected)
        await listener.start()
        try:
            assert listener.connected
            await sent(pg_url, WAKE, "web1")
            await sent(pg_url, "not_listened_to", "x")
            await sent(pg_url, PLACEMENT_CHANNEL, "web1 hv2 3")
            await async_wait_for(lambda: len(rec.seen) >= 2, what="two notifications")
            assert len(sessions(postgres_server, pg_url)) == 1
        finally:
            await listener.stop()
        assert not listener.connected

    asyncio.run(main())
    assert rec.seen == [(WAKE, "web1"), (PLACEMENT_CHANNEL, "web1 hv2 3")]
    assert rec.reconnects == 0
    assert sessions(postgres_server, pg_url) == []  # stop() closed its connection


def test_after_a_restart_the_listener_should_reconnect_and_say_so_once(
    pg_url, postgres_server, caplog
):
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="hostbridge.pglisten")

    async def main():
        listener = Listener(pg_url, [WAKE], rec.notify, rec.reconnected)
        await listener.start()
        try:
            await sent(pg_url, WAKE, "before")
            await async_wait_for(lambda: rec.seen, what="the first notification")
            await asyncio.to_thread(postgres_server.stop)
            await async_wait_for(lambda: not listener.connected, what="the loss to be noticed")
            await asyncio.sleep(1.0)  # a few attempts fail meanwhile
            await asyncio.to_thread(postgres_server.start)
            await async_wait_for(lambda: rec.reconnects == 1, what="on_reconnect")
            assert listener.connected
            await sent(pg_url, WAKE, "after")
            await async_wait_for(lambda: len(rec.seen) == 2, what="a notification after it")
        finally:
            await listener.stop()

    asyncio.run(main())
    assert rec.seen == [(WAKE, "before"), (WAKE, "after")]
    assert rec.reconnects == 1
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == ["WARNING", "INFO"]  # once per outage
    assert records[0][1].startswith("lost the pool database's notifications")
    assert "\n" not in records[0][1]
    assert records[1][1].startswith("listening to the pool database at ")


def test_a_listener_started_while_the_database_is_down_should_connect_later(
    pg_url, postgres_server
):
    rec = Recorder()

    async def main():
        await asyncio.to_thread(postgres_server.stop)
        listener = Listener(pg_url, [WAKE], rec.notify, rec.reconnected)
        try:
            await listener.start()  # returns after the first, failed, attempt
            assert not listener.connected
        finally:
            await asyncio.to_thread(postgres_server.start)
        try:
            # The notifications sent before it listened are lost: the owner must read again.
            await async_wait_for(lambda: rec.reconnects == 1, what="on_reconnect")
            await sent(pg_url, WAKE, "web1")
            await async_wait_for(lambda: rec.seen, what="a notification")
        finally:
            await listener.stop()

    asyncio.run(main())
    assert rec.seen == [(WAKE, "web1")]


def test_a_failing_handler_should_not_end_the_listening(pg_url, caplog):
    seen = []

    def notify(channel, payload):
        seen.append(payload)
        if payload == "bad":
            raise RuntimeError("the handler's bug")

    async def main():
        listener = Listener(pg_url, [WAKE], notify, lambda: None)
        await listener.start()
        try:
            await sent(pg_url, WAKE, "bad")
            await sent(pg_url, WAKE, "good")
            await async_wait_for(lambda: len(seen) == 2, what="both notifications")
            assert listener.connected
        finally:
            await listener.stop()

    asyncio.run(main())
    assert seen == ["bad", "good"]
    assert any("handler failed" in r.getMessage() for r in caplog.records)
