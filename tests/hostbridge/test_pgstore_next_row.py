"""hostbridge.pgstore: the owner's enqueue reads the VM's next row to deliver under the fence, so
that the delivery that follows it needs no read of its own; never a row that is not sure."""

import threading
import time

import pytest

from hostbridge import pgstore
from hostbridge.errors import Fenced
from tests.hostbridge.pool_harness import open_pg
from tests.hostbridge.test_pgstore_round_trips import Trace

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def owner(pg_url, stores):
    return open_pg(pg_url, stores, "hv1", claims=["web1"])


def reads(store, vm):
    """deliverable(vm)'s seqs and the round trips it took."""
    trace = Trace(store)
    seqs = [r.seq for r in store.deliverable(vm)]
    n = trace.round_trips()
    trace.close()
    return seqs, n


def test_the_owners_send_should_be_delivered_without_a_read_of_its_own(owner):
    row = owner.enqueue("web1", "k", "secret", False)  # log=no: its own two statements
    got = owner.deliverable("web1")
    assert [(r.seq, r.value) for r in got] == [(row.seq, "secret")]
    owner.enqueue("web1", "k2", "v", True)
    assert reads(owner, "web1") == ([1], 0)  # the head, not the row just added
    assert reads(owner, "web1") == ([1], 1)  # taken once: the next call reads


def test_a_send_from_another_bridge_should_leave_the_owner_to_read(owner, pg_url, stores):
    other = open_pg(pg_url, stores, "hv2", live=True)
    other.enqueue("web1", "k", "v", True)
    assert reads(owner, "web1") == ([1], 1)


def test_a_row_another_bridge_enqueued_meanwhile_should_not_be_skipped(owner, pg_url, stores):
    # hv2's enqueue holds the VM's seq until it commits; the owner's, waiting for it, gets the
    # next seq, but its snapshot predates hv2's row: that row, not the owner's, is next.
    other = open_pg(pg_url, stores, "hv2", live=True)
    done = []
    with other.batch(savepoints=False):
        other.enqueue("web1", "first", "v", True)
        waiter = threading.Thread(
            target=lambda: done.append(owner.enqueue("web1", "second", "v", True))
        )
        waiter.start()
        time.sleep(0.3)  # the owner's statement waits on the row lock
        assert not done
    waiter.join(10)
    assert done[0].seq == 2
    assert reads(owner, "web1") == ([1], 1)


def test_what_a_rolled_back_enqueue_read_should_be_forgotten(owner):
    with pytest.raises(RuntimeError), owner.batch():
        with owner.savepoint():
            owner.enqueue("web1", "gone", "v", True)
        raise RuntimeError("the group fails")
    assert reads(owner, "web1") == ([], 1)


def test_a_withdrawal_or_a_lost_fence_should_drop_what_was_read(owner):
    row = owner.enqueue("web1", "k", "v", True)
    assert owner.withdraw("web1", [row.seq], "cancelled", 0) == ([row.seq], [])
    assert reads(owner, "web1") == ([], 1)
    owner.enqueue("web1", "k", "v", True)
    owner.forget("web1")  # another host claimed it
    with pytest.raises(Fenced):
        owner.deliverable("web1")


def test_a_row_read_too_long_ago_should_be_read_again(owner, monkeypatch):
    owner.enqueue("web1", "k", "v", True)
    monkeypatch.setattr(pgstore, "AHEAD_TTL", 0.0)
    assert reads(owner, "web1") == ([1], 1)
