"""The pool's group commits beside the bridge's loop (PgStore.run_prepared, groupcommit's
Preparable units), on a real PostgreSQL: the loop goes on while a group waits for the database,
every other store call sees the group committed, and a failure keeps the rule of the loop's own
group commits (none of a failed group kept, each unit then alone)."""

import asyncio
import threading

import psycopg
import pytest

from hostbridge.errors import StoreError
from hostbridge.groupcommit import GroupCommit, Preparable
from hostbridge.store import PreparedWrite
from tests.hostbridge.pool_harness import open_pg
from tests.hostbridge.test_pgstore_round_trips import Trace

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(pg_url, stores):
    return open_pg(pg_url, stores, "hv1", claims=["web1", "web2"])


def send(store, vm, key, value="v"):
    """A send's unit as the bridge makes it for the pool's store."""
    return Preparable(
        lambda db: store.enqueue(vm, key, value, True),
        lambda: store.prepare_enqueue(vm, key, value, True),
    )


class Locked:
    """Another session holding VM ``vm``'s row, as a long transaction of another bridge would:
    an enqueue to it waits. release() from another thread after ``after`` seconds."""

    def __init__(self, url, vm):
        self.conn = psycopg.connect(url)
        self.conn.execute("SELECT 1 FROM vms WHERE name = %s FOR UPDATE", (vm,))

    def release_after(self, after):
        timer = threading.Timer(after, self.conn.rollback)
        timer.start()
        return timer

    def close(self):
        self.conn.close()


def test_a_group_of_sends_should_commit_in_one_round_trip(store):
    async def main():
        committer = GroupCommit(store, max_units=60)
        await committer.run(send(store, "web1", "warm"))  # the commit thread's connection
        trace = Trace(store)
        rows = await asyncio.gather(
            *(committer.run(send(store, "web1", "k%d" % i)) for i in range(5))
        )
        n = (trace.round_trips(), trace.statements())
        trace.close()
        return rows, n

    rows, (round_trips, statements) = asyncio.run(main())
    assert [r.seq for r in rows] == [2, 3, 4, 5, 6]  # submission order is seq order
    assert (round_trips, statements) == (1, 7)  # BEGIN, five statements, COMMIT; one Sync
    assert [r.key for r in store.outbox("web1")][1:] == ["k%d" % i for i in range(5)]


def test_the_loop_should_go_on_while_a_group_waits_for_the_database(store, pg_url):
    locked = Locked(pg_url, "web1")

    async def main():
        committer = GroupCommit(store, max_units=60)
        pending = asyncio.ensure_future(committer.run(send(store, "web1", "k")))
        turns = 0
        while turns < 20:  # the group waits on the lock; the loop keeps turning
            await asyncio.sleep(0.01)
            turns += 1
        assert not pending.done()
        timer = locked.release_after(0.1)
        row = await pending
        timer.join()
        return row

    try:
        row = asyncio.run(main())
    finally:
        locked.close()
    assert row.seq == 1 and [r.key for r in store.outbox("web1")] == ["k"]


def test_a_store_call_made_meanwhile_should_see_the_group_committed(store, pg_url):
    locked = Locked(pg_url, "web1")

    async def main():
        committer = GroupCommit(store, max_units=60)
        pending = asyncio.ensure_future(committer.run(send(store, "web1", "k")))
        await asyncio.sleep(0.05)  # the group is in flight, held by the lock
        assert not pending.done()
        timer = locked.release_after(0.2)
        # Waits for the group's commit first, as if the group had committed on the loop.
        seen = [r.key for r in store.outbox("web1")]
        timer.join()
        await pending
        return seen

    try:
        assert asyncio.run(main()) == ["k"]
    finally:
        locked.close()


def test_a_row_withdrawn_while_its_enqueue_was_in_flight_should_not_be_delivered(store, pg_url):
    # The owner's enqueue reads the VM's next row for the delivery (deliverable() without a
    # round trip). Withdrawn before the enqueue landed, that row must not come back from there.
    locked = Locked(pg_url, "web1")

    async def main():
        committer = GroupCommit(store, max_units=60)
        pending = asyncio.ensure_future(committer.run(send(store, "web1", "k")))
        await asyncio.sleep(0.05)
        timer = locked.release_after(0.1)
        withdrawn = store.withdraw("web1", None, "cancelled", 0)  # after the commit
        timer.join()
        row = await pending
        return row, withdrawn

    try:
        row, withdrawn = asyncio.run(main())
    finally:
        locked.close()
    assert withdrawn == ([row.seq], [])
    assert store.deliverable("web1") == []


def test_a_failed_statement_should_fail_its_unit_alone_and_keep_the_others(store):
    def broken(db):
        raise StoreError("the unit's own write failed")

    bad = Preparable(broken, lambda: PreparedWrite("SELECT 1 / 0", None, lambda row: row))

    async def main():
        committer = GroupCommit(store, max_units=60)
        units = [send(store, "web1", "a"), bad, send(store, "web2", "b")]
        return await asyncio.gather(*(committer.run(u) for u in units), return_exceptions=True)

    first, failed, last = asyncio.run(main())
    assert isinstance(failed, StoreError) and failed.message == "the unit's own write failed"
    # The group was rolled back, then each unit ran alone: the sends are kept once each.
    assert (first.key, last.key) == ("a", "b")
    assert [r.key for r in store.outbox("web1")] == ["a"]
    assert [r.key for r in store.outbox("web2")] == ["b"]


def test_a_fence_lost_while_a_delivery_s_removal_was_in_flight_should_fail_it(
    store, pg_url, stores
):
    from hostbridge.errors import Fenced

    store.enqueue("web1", "k", "v", True)
    other = open_pg(pg_url, stores, "hv2", live=True)
    removal = Preparable(
        lambda db: store.finish_next("web1", [1], "delivered"),
        lambda: store.prepare_finish_next("web1", [1], "delivered"),
    )

    async def main():
        committer = GroupCommit(store, max_units=60)
        write = removal.prepare()  # made under fence 1
        assert other.claim("web1", force=True) == 2  # hv2 takes the VM meanwhile
        late = Preparable(removal.run, lambda: write)
        return await asyncio.gather(committer.run(late), return_exceptions=True)

    (outcome,) = asyncio.run(main())
    assert isinstance(outcome, Fenced)
    assert store.held("web1") is None  # the stale fence is forgotten
    assert [r.seq for r in store.outbox("web1")] == [1]  # nothing removed
