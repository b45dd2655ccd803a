"""Two pool bridges in-process on one real PostgreSQL database, a real agent on a pty: ownership,
wake-ups by NOTIFY, fencing and the migration handoff decided from lifecycle events
(hostbridge.pool). Forwarding over the TLS API and real processes: test_pool.py."""

import asyncio
import os
import shutil
import time

import pytest

from hostbridge import errors
from hostbridge.bridge import Bridge
from hostbridge.config import Config, PoolConfig, VmSpec
from hostbridge.lifecycle import LifecycleEvent
from tests.hostbridge.pool_harness import store_url, write_pool_key
from tests.support.agent import Agent
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(90)


class PlayedLifecycle:
    """Lifecycle's interface, with the events played by the test (as libvirt would send them)."""

    def __init__(self, uri, on_event):
        self.on_event = on_event
        self.states = {}
        self.connected = True

    async def start(self):
        pass

    async def stop(self):
        pass

    def state(self, name):
        from hostbridge.lifecycle import RunState

        return RunState(self.states.get(name, "unknown"))

    def play(self, name, detail, state):
        self.states[name] = state
        event = detail.split("_", 1)[0]
        self.on_event(LifecycleEvent(name, None, state, event, detail, time.time(), True))


@pytest.fixture
def pool_db(postgres_server, request):
    name = "pool_" + request.node.name[-40:].lower().replace("[", "_").replace("]", "")
    return store_url(postgres_server.create_database(name))


class World:
    def __init__(self, url, monkeypatch):
        self.dir = short_tempdir()
        self.url = url
        self.key = write_pool_key(os.path.join(self.dir, "pool.key"))
        self.bridges = {}
        self.agents = {}
        monkeypatch.setattr(Bridge, "lifecycle_factory", PlayedLifecycle)

    def config(self, host, vms=()):
        return Config(
            vms=[VmSpec(n, "pty:" + os.path.join(self.dir, n), "flag") for n in vms],
            discover=False,
            libvirt_uri="played",
            store_url=self.url,
            pool=PoolConfig(host=host, url="https://%s.invalid:8443" % host, key_file=self.key),
        )

    async def start(self, host, vms=()):
        b = Bridge(self.config(host, vms))
        await b.start()
        self.bridges[host] = b
        return b

    async def agent(self, name, bridge):
        a = self.agents[name] = Agent(os.path.join(self.dir, name))
        a.start()
        await async_wait_for(lambda: bridge.vm(name).agent == "connected", what="agent synced")
        return a

    async def close(self):
        for b in self.bridges.values():
            await b.stop()
        for a in self.agents.values():
            a.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(url, monkeypatch, body):
    async def main():
        w = World(url, monkeypatch)
        try:
            await body(w)
        finally:
            await w.close()

    asyncio.run(main())


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


def test_the_host_that_attaches_a_vm_should_own_it_and_every_bridge_should_list_it(
    pool_db, monkeypatch
):
    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        hv2 = await w.start("hv2")
        await async_wait_for(lambda: hv2.pool.owner("web1") == "hv1", what="placement seen")
        listed = {v.name: v.host for v in hv2.vms()}
        assert listed == {"web1": "hv1"}
        assert [v.host for v in hv1.vms()] == ["hv1"]

    run(pool_db, monkeypatch, body)


def test_a_message_queued_by_another_bridge_should_wake_the_owner_and_arrive_once(
    pool_db, monkeypatch
):
    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        hv2 = await w.start("hv2")
        agent = await w.agent("web1", hv1)
        await async_wait_for(lambda: "web1" in hv2.pool.placements, what="placement seen")
        r = await hv2.send("web1", "com.example.k", "from-hv2")
        assert r.outcome == "queued"  # hv2 does not run it: the shared outbox
        # No poll anywhere: the enqueue's NOTIFY woke hv1's delivery.
        await async_wait_for(lambda: hv1.vm("web1").queued == 0, what="delivered by hv1")
        assert guest_value(agent, "com.example.k") == "from-hv2"
        r2 = await hv1.send("web1", "com.example.k", "from-hv1")
        assert (r2.outcome, r2.seq) == ("delivered", r.seq + 1)  # one sequence across hosts

    run(pool_db, monkeypatch, body)


def test_a_bridge_that_lost_the_vm_should_stop_delivering_and_queue_instead(pool_db, monkeypatch):
    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        hv2 = await w.start("hv2")
        agent = await w.agent("web1", hv1)
        assert hv2.pool.claim("web1", force=True)  # as at RESUMED_MIGRATED on hv2
        await async_wait_for(lambda: hv1.store.held("web1") is None, what="hv1 fenced")
        r = await hv1.send("web1", "com.example.k", "late")
        assert r.outcome == "queued"  # not written to the guest: hv1 no longer owns it
        with pytest.raises(errors.Fenced):
            hv1.store.deliverable("web1")
        assert guest_value(agent, "com.example.k") is None
        assert hv1.vm("web1").queued == 1

    run(pool_db, monkeypatch, body)


def test_a_failed_migration_should_give_delivery_back_to_the_source(pool_db, monkeypatch):
    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        agent = await w.agent("web1", hv1)
        lc = hv1.lifecycle
        lc.play("web1", "SUSPENDED_MIGRATED", "migrating")
        r = await hv1.send("web1", "com.example.k", "during")
        assert r.outcome == "queued"  # the source stopped delivering at once
        assert guest_value(agent, "com.example.k") is None
        # The switch-over would end the link: it is not connected again meanwhile.
        assert hv1.local_guest("web1").session.connects_held
        lc.play("web1", "RESUMED_MIGRATED", "running")  # the migration failed: it runs here
        assert not hv1.local_guest("web1").session.connects_held
        await async_wait_for(lambda: hv1.vm("web1").queued == 0, what="delivered again")
        assert guest_value(agent, "com.example.k") == "during"
        assert hv1.pool.owner("web1") == "hv1"

    run(pool_db, monkeypatch, body)


def test_a_channel_found_while_the_vm_migrates_in_should_wait_for_resumed_migrated(
    pool_db, monkeypatch
):
    async def body(w):
        hv1 = await w.start("hv1")
        lc = hv1.lifecycle
        lc.play("web1", "STARTED_MIGRATED", "migrating")
        await hv1._found("web1", os.path.join(w.dir, "web1.sock"))
        assert hv1.local_guest("web1") is None and "web1" in hv1.pool.deferred
        since = hv1.events.last_id
        lc.play("web1", "RESUMED_MIGRATED", "running")
        assert hv1.local_guest("web1") is not None and hv1.pool.owner("web1") == "hv1"
        # The destination announces the VM's new run state, as the source announced the pause.
        events = hv1.events.after(since, vm="web1").events
        states = [
            (e.fields["run_state"], e.fields["reason"]) for e in events if e.type == "vm.state"
        ]
        assert states == [("running", "RESUMED_MIGRATED")]

    run(pool_db, monkeypatch, body)


def test_a_claim_made_while_a_bridge_starts_should_be_known_to_it(pool_db, monkeypatch):
    """A claim committed just after the starting bridge read the placements is heard of (the
    bridge LISTENs before it reads), not missed until its next restart."""

    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        await async_wait_for(lambda: hv1.pool.owner("web1") == "hv1", what="hv1 owns web1")
        from hostbridge.pgstore import PgStore

        real = PgStore.placements

        def read_then_claim(store):
            seen = real(store)
            if store.host == "hv2":  # hv3 claims web1 right after hv2's read
                hv3 = PgStore(w.url, "hv3", hv1.pool.key)
                try:
                    hv3.register_host("https://hv3.invalid:8443", 15)
                    assert hv3.claim("web1", force=True) is not None
                finally:
                    hv3.close()
            return seen

        monkeypatch.setattr(PgStore, "placements", read_then_claim)
        hv2 = await w.start("hv2")
        await async_wait_for(lambda: hv2.pool.owner("web1") == "hv3", what="hv2 heard the claim")

    run(pool_db, monkeypatch, body)


def test_the_pool_should_carry_on_when_its_database_fails_over_to_a_replica(monkeypatch):
    from tests.support.postgres import PostgresCluster, StandbyCluster

    with PostgresCluster() as pg, StandbyCluster(pg) as standby:
        # Synchronous replication: a commit, hence a "queued" or "delivered" answer, is on the
        # replica before it returns, so the failover loses nothing that was acknowledged.
        pg.psql("ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")
        url = (
            "postgresql:///ovmd?host=%s,%s&port=%d,%d&user=ovmd&target_session_attrs=read-write"
            % (pg.dir, standby.dir, pg.port, standby.port)
        )

        async def body(w):
            hv1 = await w.start("hv1", ["web1"])
            agent = await w.agent("web1", hv1)
            assert (await hv1.send("web1", "com.example.a", "1")).outcome == "delivered"
            await hv1.delete("web1", "nothing")  # delivered too: the guest drops a missing key
            w.agents["web1"].stop()  # messages now wait in the outbox, on both servers
            await async_wait_for(lambda: hv1.vm("web1").agent == "disconnected", what="away")
            queued = await hv1.send("web1", "com.example.b", "2")
            assert queued.outcome == "queued"
            pg.kill()
            failures = []
            with pytest.raises(errors.StoreUnavailable) as e:
                await hv1.send("web1", "com.example.c", "3")
            assert "\n" not in e.value.message and e.value.code == "store_unavailable"
            standby.promote()

            async def sent():
                try:
                    return (await hv1.send("web1", "com.example.c", "3")).outcome == "queued"
                except errors.StoreUnavailable as exc:
                    failures.append(exc.message)
                    return False

            deadline = time.monotonic() + 30
            while not await sent():
                assert time.monotonic() < deadline, failures[-1:]
                await asyncio.sleep(0.2)
            agent.start()
            await async_wait_for(lambda: hv1.vm("web1").queued == 0, what="drained after failover")
            assert guest_value(agent, "com.example.b") == "2"
            assert guest_value(agent, "com.example.c") == "3"

        run(url, monkeypatch, body)


def test_a_placement_notice_older_than_what_the_bridge_read_should_change_nothing(
    pool_db, monkeypatch
):
    from hostbridge.pgstore import PLACEMENT_CHANNEL

    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        await async_wait_for(lambda: hv1.pool.owner("web1") == "hv1", what="hv1 owns web1")
        fence = hv1.store.held("web1")
        assert fence is not None
        # A claim by hv9 at the fence before: heard after a read that saw hv1's later claim.
        hv1.pool._notified(PLACEMENT_CHANNEL, "web1 hv9 %d" % (fence - 1))
        assert hv1.pool.owner("web1") == "hv1" and hv1.store.held("web1") == fence
        # hv1's own claim notice, heard again, changes nothing either.
        hv1.pool._notified(PLACEMENT_CHANNEL, "web1 hv1 %d" % fence)
        assert hv1.pool.owner("web1") == "hv1" and hv1.store.held("web1") == fence

    run(pool_db, monkeypatch, body)


def test_mirror_changes_the_database_refused_should_be_saved_at_a_later_flush(pool_db, monkeypatch):
    import psycopg

    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        agent = await w.agent("web1", hv1)
        hv1.flush()

        def saved():
            with psycopg.connect(pool_db) as db:
                return db.execute(
                    "SELECT key FROM mirror WHERE vm = 'web1' AND key LIKE 'com.example.%'"
                ).fetchall()

        with psycopg.connect(pool_db) as other:
            other.execute("LOCK TABLE mirror IN ACCESS EXCLUSIVE MODE")  # held until rollback
            assert agent.ovmd("-p", "com.example.g=1").returncode == 0
            await async_wait_for(
                lambda: "com.example.g" in hv1.guest("web1").mirror.entries, what="mirrored"
            )
            hv1.flush()  # each VM's save times out on the lock: logged, and given back
            other.rollback()
        assert saved() == []
        hv1.flush()
        assert saved() == [("com.example.g",)]

    run(pool_db + "&options=-c%20lock_timeout%3D200", monkeypatch, body)


def test_every_bridge_should_tell_its_change_stream_when_a_vm_changes_host(pool_db, monkeypatch):
    async def body(w):
        hv1 = await w.start("hv1", ["web1"])
        hv2 = await w.start("hv2")
        await async_wait_for(lambda: hv2.pool.owner("web1") == "hv1", what="placement seen")
        since1, since2 = hv1.events.last_id, hv2.events.last_id

        def placed(bridge, since):
            events = bridge.events.after(since, vm="web1").events
            return [e.fields["host"] for e in events if e.type == "vm.placed"]

        # The VM moves to hv2 (its RESUMED_MIGRATED there: a forced claim): both streams say so,
        # hv2's from its own claim, hv1's from the placement notice.
        hv2.lifecycle.play("web1", "RESUMED_MIGRATED", "running")
        await async_wait_for(lambda: hv1.pool.owner("web1") == "hv2", what="hv1 heard the claim")
        assert placed(hv2, since2) == ["hv2"]
        assert placed(hv1, since1) == ["hv2"]
        # A notice older than what is known changes nothing and tells nothing.
        from hostbridge.pgstore import PLACEMENT_CHANNEL

        hv1.pool._notified(PLACEMENT_CHANNEL, "web1 hv1 1")
        assert placed(hv1, since1) == ["hv2"]

    run(pool_db, monkeypatch, body)
