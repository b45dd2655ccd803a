"""hostbridge.pgstore's round trips: each one stops the bridge's event loop for as long as the
database takes to answer, so a send through the owner must cost as few as the guarantees allow.
Counted from libpq's own trace of the store's connection: a round trip is a message after which
the client waits for the server (Sync, or Query of the simple protocol)."""

import asyncio
import os
import shutil
import tempfile
import uuid

import psycopg
import pytest

from hostbridge.bridge import Bridge
from hostbridge.config import Config, PoolConfig, VmSpec
from hostbridge.errors import StoreError
from hostbridge.groupcommit import GroupCommit
from hostbridge.store import MirrorRow, MirrorSave
from tests.hostbridge.pool_harness import open_pg, store_url, write_pool_key
from tests.hostbridge.test_bridge_pool import PlayedLifecycle
from tests.support.agent import Agent
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(pg_url, stores):
    return open_pg(pg_url, stores, "hv1", claims=["web1"])


class Trace:
    """libpq's trace of ``store``'s connections (its own, and its commit thread's once made):
    the round trips and statements since start."""

    def __init__(self, store):
        self._traced = []
        for conn in (store._conn, store._commit_conn):
            if conn is not None:
                file = tempfile.TemporaryFile()
                conn.pgconn.trace(file.fileno())
                conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
                self._traced.append((conn.pgconn, file))

    def messages(self):
        lines = []
        for _, file in self._traced:
            file.seek(0)
            lines += file.read().decode("utf-8", "replace").splitlines()
        return [line.split("\t")[2].split(" ")[0] for line in lines if line.startswith("F\t")]

    def round_trips(self):
        return sum(1 for m in self.messages() if m in ("Sync", "Query"))

    def statements(self):
        return sum(1 for m in self.messages() if m in ("Execute", "Query"))

    def close(self):
        for pgconn, file in self._traced:
            pgconn.untrace()
            file.close()


def run_units(store, *units):
    async def main():
        committer = GroupCommit(store, max_units=60)
        return await asyncio.gather(*(committer.run(u) for u in units))

    return asyncio.run(main())


def test_a_group_commit_of_one_send_should_cost_one_round_trip(store):
    trace = Trace(store)
    (row,) = run_units(store, lambda db: store.enqueue("web1", "k", "v", True))
    # No BEGIN, no COMMIT: the enqueue's one statement commits by itself.
    assert row.seq == 1
    assert (trace.round_trips(), trace.statements()) == (1, 1)
    trace.close()


def test_a_second_write_in_a_block_promised_one_should_fail_before_it_is_sent(store):
    with store.alone():
        store.enqueue("web1", "k", "v", True)
        trace = Trace(store)
        with pytest.raises(StoreError) as e:
            store.enqueue("web1", "k2", "v", True)
        assert "second write" in e.value.message
        assert trace.statements() == 0
        trace.close()
    assert [r.key for r in store.outbox("web1")] == ["k"]
    with store.alone():  # the promise holds for its own block only
        store.enqueue("web1", "k3", "v", True)
    with store.batch(), pytest.raises(StoreError):
        store.alone().__enter__()


def test_the_record_of_a_delivery_and_the_read_of_the_next_row_should_share_a_round_trip(store):
    store.enqueue("web1", "a", "1", True)
    store.enqueue("web1", "b", "2", True)
    assert [r.seq for r in store.deliverable("web1")] == [1]
    trace = Trace(store)
    (rows,) = run_units(store, lambda db: store.finish_next("web1", [1], "delivered"))
    assert [r.seq for r in rows] == [2]
    assert trace.round_trips() == 1  # the statement commits by itself
    trace.close()


def test_units_and_savepoints_of_a_group_should_add_one_round_trip_each_at_most(store):
    # A group of several: each unit's statement is one round trip, its savepoint (when the
    # group runs unit by unit) none, and the COMMIT one.
    trace = Trace(store)
    with store.batch():
        for i in range(3):
            with store.savepoint():
                store.enqueue("web1", "k%d" % i, "v", True)
    assert (trace.round_trips(), trace.statements()) == (4, 11)  # BEGIN, 3 x 3, COMMIT
    trace.close()


def test_a_batch_of_mirror_saves_should_cost_one_round_trip_a_vm(store):
    for vm in ("web2", "web3"):
        store.vm(vm)
    trace = Trace(store)
    with store.batch():  # as the bridge's flush of every changed mirror, once a second
        for vm in ("web1", "web2", "web3"):
            store.save_mirror(
                vm, [MirrorRow("k", "v", 1.0, "guest", False)], [], False, 1.0, "g", 1
            )
    assert trace.round_trips() == 4
    trace.close()
    assert [r.key for r in store.mirror("web3")] == ["k"]


def test_the_bridge_s_flush_of_many_mirrors_should_cost_one_round_trip_in_all(store):
    vms = ["web%d" % i for i in range(1, 41)]
    for vm in vms[1:]:
        store.vm(vm)
    trace = Trace(store)
    row = MirrorRow("k", "v", 1.0, "guest", False)
    assert store.save_mirrors([MirrorSave(vm, [row], [], False, 1.0, "g", 1) for vm in vms]) == {}
    assert (trace.round_trips(), trace.statements()) == (1, 3)  # BEGIN, the save, COMMIT
    trace.close()
    assert all([r.key for r in store.mirror(vm)] == ["k"] for vm in vms)


def test_a_transaction_whose_caller_went_on_after_an_error_should_not_look_committed(store):
    # The server turns the COMMIT of a failed transaction into a ROLLBACK without an error: the
    # block must fail, or its caller would take writes that are gone for kept.
    with pytest.raises(StoreError) as caught, store.batch(savepoints=False):
        store.enqueue("web1", "gone", "v", True)
        with pytest.raises(StoreError):
            store._run("SELECT 1/0")
    assert "rolled back" in str(caught.value)
    assert store.queued("web1") == 0
    assert store.enqueue("web1", "after", "v", True).seq == 1  # the connection goes on


def test_a_send_through_the_owner_should_cost_about_two_round_trips(postgres_server, monkeypatch):
    # Alone (no group to share): the enqueue, and the removal of the acknowledged row (which
    # reads the next), each one statement committed by itself; the delivery's read comes with
    # the enqueue. It cost 12 once: BEGIN, SAVEPOINT and RELEASE of their own, a read before
    # the row and another after its removal; then 4, with a COMMIT after each.
    # No event played: every VM counts as running here, as without libvirt.
    monkeypatch.setattr(Bridge, "lifecycle_factory", PlayedLifecycle)
    work = short_tempdir()
    key_file = write_pool_key(os.path.join(work, "pool.key"))
    url = store_url(postgres_server.create_database("rt_%s" % uuid.uuid4().hex[:12]))
    config = Config(
        vms=[VmSpec("web1", "pty:" + os.path.join(work, "web1"), "flag")],
        discover=False,
        libvirt_uri="none",
        store_url=url,
        pool=PoolConfig(host="hv1", url="https://hv1.invalid:8443", key_file=key_file),
    )
    agent = Agent(os.path.join(work, "web1"))

    async def main():
        bridge = Bridge(config)
        await bridge.start()
        try:
            agent.start()
            await async_wait_for(lambda: bridge.vm("web1").agent == "connected", what="sync")
            for i in range(3):  # psycopg prepares a statement at its 5th use: past that
                await bridge.send("web1", "k", "warm-%d" % i)
            trace = Trace(bridge.store)
            for i in range(10):
                r = await bridge.send("web1", "k", "v-%d" % i)
                assert r.outcome == "delivered"
            n = trace.round_trips()
            trace.close()
            return n
        finally:
            await bridge.stop()

    try:
        n = asyncio.run(main())
    finally:
        agent.close()
        shutil.rmtree(work, ignore_errors=True)
    # 2 a send; a second's flush of the mirror may fall in the window too.
    assert 20 <= n <= 22, n
