"""The Bridge's operations, in-process, against real guest agents on real ptys."""

import asyncio
import os
import shutil
import time

import pytest

from hostbridge import errors
from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits, VmSpec
from ovmproto.messages import Set
from tests.hostbridge.bridge_harness import pty_config
from tests.hostbridge.scripted_guest import ScriptedGuest
from tests.support.agent import Agent
from tests.support.tempdirs import short_dir, short_tempdir
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


class World:
    """A bridge over pty channels for ``names`` and a (not yet started) agent per VM."""

    def __init__(self, names):
        self.dir = short_tempdir()
        self.names = list(names)
        self.agents = {n: Agent(os.path.join(self.dir, n)) for n in names}
        self.bridge = None

    def config(self):
        return pty_config(self.dir, *self.names)

    async def start_bridge(self):
        self.bridge = Bridge(self.config())
        await self.bridge.start()
        return self.bridge

    async def start_agent(self, name):
        agent = self.agents[name]
        agent.start()
        await async_wait_for(
            lambda: self.bridge.vm(name).agent == "connected", what="agent %s synced" % name
        )
        return agent

    async def stop_agent(self, name, kill=False):
        agent = self.agents[name]
        agent.kill() if kill else agent.stop()
        await async_wait_for(
            lambda: self.bridge.vm(name).agent == "disconnected", what="agent %s gone" % name
        )

    async def close(self):
        if self.bridge is not None:
            await self.bridge.stop()
        for a in self.agents.values():
            a.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_world(names, body):
    async def main():
        world = World(names)
        try:
            await world.start_bridge()
            await body(world)
        finally:
            await world.close()

    asyncio.run(main())


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


def test_a_send_to_a_connected_agent_should_be_delivered_and_stored_by_the_guest():
    async def body(w):
        agent = await w.start_agent("vm1")
        r = await w.bridge.send("vm1", "com.example.k", "hello")
        assert (r.outcome, r.seq) == ("delivered", 1)
        assert guest_value(agent, "com.example.k") == "hello"
        assert w.bridge.vm("vm1").queued == 0
        assert w.bridge.audit("vm1")[0].outcome == "delivered"

    run_world(["vm1"], body)


def test_sends_while_the_agent_is_away_should_queue_then_arrive_in_order_exactly_once():
    async def body(w):
        results = [await w.bridge.send("vm1", "k", "v%d" % i) for i in range(5)]
        results.append(await w.bridge.delete("vm1", "gone"))
        assert [r.outcome for r in results] == ["queued"] * 6
        assert w.bridge.vm("vm1").queued == 6
        agent = await w.start_agent("vm1")
        await async_wait_for(lambda: w.bridge.vm("vm1").queued == 0, what="outbox drained")
        assert guest_value(agent, "k") == "v4"
        # In order and once: the guest's change counter saw exactly the five sets (the del of a
        # missing key changes nothing).
        s = w.bridge.guest("vm1")
        await async_wait_for(lambda: s.mirror.gseq == 5, what="mirror at gseq 5")
        await w.stop_agent("vm1")
        agent.start()
        await async_wait_for(lambda: w.bridge.vm("vm1").agent == "connected", what="resync")
        assert guest_value(agent, "k") == "v4"
        assert s.mirror.gseq == 5  # nothing was applied twice after the reconnect
        assert [a.outcome for a in w.bridge.audit("vm1")] == ["delivered"] * 6

    run_world(["vm1"], body)


def test_no_queue_should_refuse_when_the_agent_is_not_connected_and_keep_nothing():
    async def body(w):
        with pytest.raises(errors.AgentNotConnected):
            await w.bridge.send("vm1", "k", "no-queue-value", queue=False)
        assert w.bridge.vm("vm1").queued == 0
        assert w.bridge.audit("vm1")[0].outcome == "refused"
        assert w.bridge.audit("vm1")[0].value is None
        agent = await w.start_agent("vm1")
        r = await w.bridge.send("vm1", "k2", "v", queue=False)
        assert r.outcome == "delivered"
        assert guest_value(agent, "k") is None

    run_world(["vm1"], body)


def test_query_should_be_live_when_connected_and_stale_from_the_mirror_when_not():
    async def body(w):
        agent = await w.start_agent("vm1")
        assert agent.ovmd("-p", "guest.key=guest-value").returncode == 0
        kv = await w.bridge.query("vm1", "guest.key")
        assert (kv.value, kv.origin, kv.stale) == ("guest-value", "guest", False)
        s = w.bridge.guest("vm1")
        await async_wait_for(lambda: "guest.key" in s.mirror.entries, what="mirror update")
        with pytest.raises(errors.NotFound):
            await w.bridge.query("vm1", "missing")
        await w.stop_agent("vm1")
        kv = await w.bridge.query("vm1", "guest.key")
        assert (kv.value, kv.stale) == ("guest-value", True)
        assert kv.last_seen is not None and kv.last_seen <= __import__("time").time()
        keys = await w.bridge.keys("vm1")
        assert keys.stale and [e.key for e in keys.entries] == ["guest.key"]
        with pytest.raises(errors.NotFound):
            await w.bridge.query("vm1", "missing")

    run_world(["vm1"], body)


def test_changes_made_while_the_bridge_was_away_should_reach_the_mirror_on_reconnect():
    async def main():
        w = World(["vm1"])
        try:
            await w.start_bridge()
            agent = await w.start_agent("vm1")
            await w.bridge.stop()
            assert agent.ovmd("-p", "while.away=yes").returncode == 0
            await w.start_bridge()
            await async_wait_for(lambda: w.bridge.vm("vm1").agent == "connected", what="sync")
            s = w.bridge.guest("vm1")
            await async_wait_for(lambda: "while.away" in s.mirror.entries, what="refresh")
        finally:
            await w.close()

    asyncio.run(main())


def test_errors_should_name_the_problem():
    async def body(w):
        with pytest.raises(errors.UnknownVm):
            await w.bridge.send("nope", "k", "v")
        with pytest.raises(errors.InvalidInput) as e:
            await w.bridge.send("vm1", "k" * 257, "v")
        assert e.value.code == "key_too_long" and e.value.http_status == 413
        with pytest.raises(errors.InvalidInput) as e:
            await w.bridge.send("vm1", "k", "v" * 8193)
        assert e.value.code == "value_too_long" and "8192" in e.value.message
        with pytest.raises(errors.InvalidInput) as e:
            await w.bridge.query("vm1", "a=b")
        assert e.value.code == "invalid_key"
        with pytest.raises(errors.UnknownVm):
            w.bridge.vm("nope")

    run_world(["vm1"], body)


def test_a_log_off_value_should_never_reach_audit_logs_or_disk_after_delivery(caplog):
    secret = "pw-" + os.urandom(12).hex()

    async def body(w):
        agent = await w.start_agent("vm1")
        with caplog.at_level("DEBUG"):
            r = await w.bridge.send("vm1", "root-password", secret, log=False)
            assert r.outcome == "delivered"
            await w.stop_agent("vm1")
            q = await w.bridge.send("vm1", "root-password2", secret + "-queued", log=False)
            assert q.outcome == "queued"
            await w.start_agent("vm1")
            await async_wait_for(lambda: w.bridge.vm("vm1").queued == 0, what="delivery")
            assert (await w.bridge.query("vm1", "root-password")).value == secret
            await asyncio.sleep(1.5)  # let the mirror flush run
        assert all(a.value is None for a in w.bridge.audit("vm1"))
        assert secret not in caplog.text
        await w.bridge.stop()
        w.bridge = None
        data = b""
        for name in os.listdir(w.dir):
            if name.startswith("bridge.sqlite3"):
                with open(os.path.join(w.dir, name), "rb") as f:
                    data += f.read()
        assert data and secret.encode() not in data
        assert secret.encode() in agent.cache_file_bytes()  # the guest has it, as it should

    run_world(["vm1"], body)


def test_a_second_bridge_on_the_same_database_should_be_refused():
    async def body(w):
        other = Bridge(w.config())
        with pytest.raises(errors.BridgeError) as e:
            await other.start()
        assert "another bridge" in e.value.message

    run_world(["vm1"], body)


@pytest.mark.parametrize("how", ["cancelled", "expired"])
def test_a_send_waiting_for_its_acknowledgement_should_end_when_its_message_is_withdrawn(how):
    """The second of two sends waits behind the first, which the guest never answers: a cancel
    (or its expiry) ends the wait with that outcome, long before the send's timeout."""

    async def main():
        with short_dir() as d:
            guest = await ScriptedGuest(str(d / "chan")).start()
            limits = Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0)
            config = Config(
                vms=[VmSpec("vm1", "unix:" + guest.path, "flag")],
                db=str(d / "bridge.sqlite3"),
                discover=False,
                limits=limits,
            )
            bridge = Bridge(config)
            await bridge.start()
            try:
                await async_wait_for(lambda: bridge.vm("vm1").agent == "connected", what="sync")
                guest.silent = {"set"}
                first = asyncio.ensure_future(
                    bridge.send("vm1", "first", "v", timeout=60, expires=3600)
                )
                await async_wait_for(lambda: guest.of_type(Set), what="the first set written")
                second = asyncio.ensure_future(
                    bridge.send("vm1", "second", "v", log=False, timeout=60, expires=3600)
                )
                await async_wait_for(lambda: bridge.vm("vm1").queued == 2, what="both queued")
                listed = bridge.queue("vm1").messages
                assert [(m.seq, m.key, m.in_flight) for m in listed] == [
                    (1, "first", True),
                    (2, "second", False),
                ]
                if how == "cancelled":
                    assert bridge.cancel("vm1", 2).cancelled == [2]
                else:
                    assert bridge.expire(time.time() + 7200) == 2  # both are past theirs
                with pytest.raises((errors.MessageCancelled, errors.MessageExpired)) as caught:
                    await asyncio.wait_for(second, 10)
                assert caught.value.code == how
                assert "message 2 to VM 'vm1'" in caught.value.message
                assert [m.key for m in guest.of_type(Set)] == ["first"]
                newest = bridge.audit("vm1")[0]
                assert (newest.key, newest.outcome, newest.value) == ("second", how, None)
                first.cancel()
            finally:
                await bridge.stop()
                await guest.stop()

    asyncio.run(main())
