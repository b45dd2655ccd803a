"""hostbridge.pgstore: the pool's store on a real PostgreSQL cluster.

The contract of hostbridge.store.Store holds for both backends (the ``store`` fixture runs those
tests on each); then what only a pool has: ownership and fencing between two bridges, the owner's
wake-up, log=no values that never reach the database in clear (its tables nor its WAL), and what a
caller sees when the database goes away and comes back.
"""

import asyncio
import contextlib
import glob
import os
import threading
import time
import uuid

import psycopg
import pytest

from hostbridge.errors import Fenced, StoreError, StoreUnavailable
from hostbridge.groupcommit import CommitFailed, GroupCommit
from hostbridge.pgstore import (
    AUDIT_PRUNE_EVERY,
    PLACEMENT_CHANNEL,
    PgStore,
    channel_for_host,
    redact,
)
from hostbridge.poolkey import PoolKey
from hostbridge.store import MirrorRow, MirrorSave, Store
from tests.hostbridge.pool_harness import STORE_KEY, open_pg
from tests.support.waiting import wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, stores):
    """A function opening a store of the backend under test (keyword arguments as Store's)."""

    def make(**kwargs):
        if request.param == "sqlite":
            s = Store(str(tmp_path / "bridge.sqlite3"), **kwargs)
            stores.append(s)
            return s
        url = request.getfixturevalue("pg_url")
        s = open_pg(url, stores, **kwargs)
        s.register_host("https://hv1.example:8443", 15)
        return s

    return make


def add_vm(store, name):
    """The VM, delivered by this store (in a pool: claimed)."""
    row = store.vm(name)
    if isinstance(store, PgStore):
        assert store.claim(name) is not None
    return row


def listen(url, *channels):
    conn = psycopg.connect(url, autocommit=True)
    for channel in channels:
        conn.execute("LISTEN %s" % channel)
    return conn


def notifications(conn, want=1, timeout=5.0):
    """At least ``want`` notifications as (channel, payload), or those that came in time."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [(n.channel, n.payload) for n in conn.notifies(timeout=0.1)]
    return got


# -- the Store contract, on both backends --------------------------------------------------------


def test_outbox_rows_should_be_numbered_in_order_and_finished(backend):
    s = backend()
    add_vm(s, "a")
    values = ["v0", "caf\u00e9 \u2603", "with a \x00 nul", None]
    rows = [s.enqueue("a", "k%d" % i, v, True, expires=None) for i, v in enumerate(values)]
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert [(r.seq, r.key, r.value, r.log) for r in s.outbox("a")] == [
        (1, "k0", "v0", True),
        (2, "k1", "caf\u00e9 \u2603", True),
        (3, "k2", "with a \x00 nul", True),
        (4, "k3", None, True),
    ]
    assert s.deliverable("a")[0].seq == 1
    assert s.outbox("a", after=2, limit=1)[0].seq == 3
    assert s.queued("a") == 4 and s.in_outbox("a", 2)
    s.finish("a", [1, 2], "delivered")
    assert [r.seq for r in s.outbox("a")] == [3, 4]
    assert not s.in_outbox("a", 2)
    assert s.enqueue("a", "k", "v", True).seq == 5  # numbers are never reused
    assert s.queued_counts() == {"a": 3}
    with pytest.raises(KeyError):
        s.enqueue("nobody", "k", "v", True)
    assert [(r[2], r[5], r[6]) for r in s.audit("a")][-2:] == [
        ("k1", "delivered", "caf\u00e9 \u2603"),
        ("k0", "delivered", "v0"),
    ]


def test_a_vm_should_keep_its_epoch_and_take_a_new_channel(backend):
    s = backend()
    a = s.vm("a", "pty:/x", "flag")
    assert s.vm("a").epoch == a.epoch and len(a.epoch) == 16
    assert s.vm("a").channel == "pty:/x"
    b = s.vm("a", "unix:/y", None)
    assert (b.epoch, b.channel, b.source) == (a.epoch, "unix:/y", None)
    s.vm("b")
    assert [v.name for v in s.vms()] == ["a", "b"]


def test_a_log_no_value_should_be_read_back_but_never_audited(backend):
    s = backend()
    add_vm(s, "a")
    s.enqueue("a", "password", "hunter2", False)
    s.enqueue("a", "plain", "visible", True)
    rows = s.outbox("a")
    assert [(r.key, r.value, r.log) for r in rows] == [
        ("password", "hunter2", False),
        ("plain", "visible", True),
    ]
    assert s.deliverable("a")[0].value == "hunter2"
    assert s.hidden("a") == {"password"}
    assert s.secret_pending("a", "password", 0) and not s.secret_pending("a", "password", 1)
    assert [(r[2], r[3], r[6]) for r in s.audit("a")] == [
        ("plain", 7, "visible"),
        ("password", 7, None),
    ]
    s.finish("a", [1], "delivered")
    assert [r.key for r in s.outbox("a")] == ["plain"]


def test_idempotency_keys_should_be_remembered_settled_and_bounded(backend):
    s = backend(idempotency_keep=2, idempotency_ttl=100.0)
    add_vm(s, "a")
    now = time.time()
    s.enqueue("a", "k", "v", True, ts=now, idempotency=("first", "d1"))
    row = s.idempotent("a", "first", now=now)
    assert (row.key, row.digest, row.seq, row.outcome) == ("first", "d1", 1, "queued")
    s.finish("a", [1], "delivered")
    assert s.idempotent("a", "first", now=now).outcome == "delivered"
    assert s.idempotent("a", "first", now=now + 101) is None  # older than the ttl
    s.enqueue("a", "k", "v", True, ts=now, idempotency=("refused", "d2"))
    s.finish("a", [2], "refused")
    assert s.idempotent("a", "refused", now=now) is None  # may be sent afresh
    s.enqueue("a", "k", "v", True, ts=now, idempotency=("third", "d3"))
    s.enqueue("a", "k", "v", True, ts=now, idempotency=("fourth", "d4"))
    # Only the keys of the VM's last idempotency_keep messages are kept.
    assert s.idempotent("a", "first", now=now) is None
    assert s.idempotent("a", "third", now=now).seq == 3
    # The same key again replaces the older send.
    s.enqueue("a", "k", "v", True, ts=now, idempotency=("fourth", "d5"))
    assert s.idempotent("a", "fourth", now=now).digest == "d5"


def test_the_audit_should_keep_the_newest_rows_of_each_vm(backend):
    s = backend(audit_keep=5)
    add_vm(s, "a")
    add_vm(s, "b")
    s.enqueue("b", "other", "v", True)
    # A pool bridge prunes at its first audit row of a VM and every AUDIT_PRUNE_EVERY rows; after
    # 2 * AUDIT_PRUNE_EVERY + 1 rows both backends hold exactly the newest five.
    count = 2 * AUDIT_PRUNE_EVERY + 1
    for i in range(count - 1):
        s.enqueue("a", "k%d" % i, "v", True)
        assert len(s.audit("a", limit=1000)) <= 5 + AUDIT_PRUNE_EVERY
    s.audit_refused("a", "last", "v", True)
    kept = s.audit("a", limit=1000)
    assert [r[2] for r in kept] == ["last"] + ["k%d" % i for i in range(count - 2, count - 6, -1)]
    assert [r[5] for r in kept][:2] == ["refused", "queued"]
    assert [r[2] for r in s.audit("b")] == ["other"]


def test_the_mirror_should_be_saved_with_hidden_values_left_out(backend):
    s = backend()
    s.vm("a")
    s.enqueue("a", "secret", "x", False)
    assert s.hidden("a") == {"secret"}
    rows = [
        MirrorRow("one", "1", 1.0, "guest", False),
        MirrorRow("secret", "hidden value", 2.0, "host", True),
        MirrorRow("two", "2 \x00", 3.0, "guest", False),
    ]
    s.save_mirror("a", rows, [], True, 10.0, "gid1", 3)
    assert s.mirror("a") == [rows[0], MirrorRow("secret", None, 2.0, "host", True), rows[2]]
    vm = s.vm("a")
    assert (vm.last_seen, vm.gid, vm.gseq) == (10.0, "gid1", 3)
    # A rewritten key moves to the end; a deleted one goes; unhidden keys leave the hidden set.
    s.save_mirror(
        "a",
        [MirrorRow("one", "1b", 4.0, "guest", False)],
        ["two"],
        False,
        11.0,
        "gid1",
        4,
        unhidden=["secret"],
    )
    assert [(r.key, r.value) for r in s.mirror("a")] == [("secret", None), ("one", "1b")]
    assert s.hidden("a") == set()
    s.save_mirror("a", [MirrorRow("new", "n", 5.0, "guest", False)], [], True, 12.0, "gid2", 1)
    assert [r.key for r in s.mirror("a")] == ["new"]


def test_many_vms_mirrors_saved_at_once_should_end_as_each_saved_alone(backend):
    s, alone = backend(), {}
    for vm in ("a", "b", "c", "d"):
        s.vm(vm)
        s.enqueue(vm, "secret", "x", False)
        s.save_mirror(
            vm, [MirrorRow(k, k, 1.0, "guest", False) for k in "xyz"], [], True, 1, "g", 1
        )

    def saves():
        return [
            # a rewritten key moves to the end, a deleted key goes, a key unhidden
            MirrorSave(
                "a", [MirrorRow("x", "x2", 2.0, "host", False)], ["y"], False, 2, "g", 2, ["secret"]
            ),
            # replaced: only its new rows stay (a key both deleted and written is written)
            MirrorSave(
                "b",
                [
                    MirrorRow("n", "n", 2.0, "guest", False),
                    MirrorRow("z", "z2", 2.0, "guest", False),
                ],
                ["z"],
                True,
                3,
                "h",
                1,
            ),
            # only seen: its rows stay as they are
            MirrorSave("c", [], [], False, 4, "g", 1),
            # a hidden row without its value, written twice: the last write counts
            MirrorSave(
                "d",
                [
                    MirrorRow("secret", "v1", 2.0, "host", True),
                    MirrorRow("secret", "v2", 3.0, "host", True),
                ],
                [],
                False,
                5,
                "g",
                2,
            ),
        ]

    def state():
        return {
            vm: (
                [(r.key, r.value, r.ts, r.hidden) for r in s.mirror(vm)],
                s.hidden(vm),
                (s.vm(vm).last_seen, s.vm(vm).gid, s.vm(vm).gseq),
            )
            for vm in "abcd"
        }

    before = state()
    for m in saves():
        s.save_mirror(m.vm, m.rows, m.deleted, m.replace, m.last_seen, m.gid, m.gseq, m.unhidden)
    alone = state()
    assert alone != before
    assert alone["a"][0] == [("z", "z", 1.0, False), ("x", "x2", 2.0, False)]
    assert alone["b"][0] == [("n", "n", 2.0, False), ("z", "z2", 2.0, False)]
    assert alone["d"][0][-1] == ("secret", None, 3.0, True)
    for vm in "abcd":  # back as before, then all at once
        s.save_mirror(
            vm, [MirrorRow(k, k, 1.0, "guest", False) for k in "xyz"], [], True, 1, "g", 1
        )
        s.save_mirror(vm, [], [], False, None, None, None)
    s.enqueue("a", "secret", "x", False)
    assert s.save_mirrors(saves()) == {}
    assert state() == alone


def test_withdraw_should_delete_unwritten_rows_and_strip_written_ones(backend):
    s = backend()
    add_vm(s, "a")
    now = time.time()
    for i in range(4):
        s.enqueue(
            "a",
            "k%d" % i,
            "v%d" % i,
            i != 1,
            expires=now - 1 if i < 3 else None,
            idempotency=("id%d" % i, "d"),
        )
    assert s.expired(now) == {"a": [1, 2, 3]}
    assert s.queue_stats()["a"][0] == 4
    withdrawn, in_flight = s.withdraw("a", [1, 2, 3], "expired", written=2)
    assert (withdrawn, in_flight) == ([3], [1, 2])
    assert [r.seq for r in s.outbox("a")] == [4]
    held = s.outbox("a", withdrawn=True)
    assert [(r.seq, r.value, r.withdrawn) for r in held] == [
        (1, None, "expired"),
        (2, None, "expired"),
        (4, "v3", None),
    ]
    outcomes = {r[2]: r[5] for r in s.audit("a")}
    assert outcomes == {
        "k0": "expired_in_flight",
        "k1": "expired_in_flight",
        "k2": "expired",
        "k3": "queued",
    }
    assert s.idempotent("a", "id2").outcome == "expired"
    assert s.withdraw("a", None, "cancelled", written=2) == ([4], [1, 2])
    assert s.queued("a") == 0 and s.expired(now) == {}
    s.finish("a", [1, 2], "cancelled")
    assert s.outbox("a", withdrawn=True) == []


def test_a_failed_unit_of_a_batch_should_undo_only_itself(backend):
    s = backend()
    add_vm(s, "a")
    with s.batch():
        with s.savepoint():
            s.enqueue("a", "first", "1", True)
        with pytest.raises(RuntimeError):
            with s.savepoint():
                s.enqueue("a", "undone", "2", False)
                raise RuntimeError("the unit failed")
        with pytest.raises(KeyError), s.savepoint():
            s.enqueue("nobody", "k", "v", True)
        with s.savepoint():
            s.enqueue("a", "last", "3", True)
    assert [(r.key, r.value) for r in s.outbox("a")] == [("first", "1"), ("last", "3")]
    assert s.hidden("a") == set()
    if isinstance(s, PgStore):  # (Store's savepoint() outside a batch cannot hold a write)
        with pytest.raises(RuntimeError), s.savepoint():  # outside a batch: its own transaction
            s.enqueue("a", "gone", "4", True)
            raise RuntimeError("undone")
        assert s.queued("a") == 2


def test_the_group_committer_should_commit_units_together(backend):
    s = backend()
    add_vm(s, "a")
    committer = GroupCommit(s)

    async def main():
        units = [
            committer.run(lambda db, i=i: s.enqueue("a", "k%d" % i, "v", True)) for i in range(5)
        ]
        units.append(committer.run(lambda db: s.enqueue("nobody", "k", "v", True)))
        return await asyncio.gather(*units, return_exceptions=True)

    results = asyncio.run(main())
    assert [r.seq for r in results[:5]] == [1, 2, 3, 4, 5]
    assert isinstance(results[5], KeyError)
    assert committer.commits == 1 and committer.units == 5
    assert s.queued("a") == 5


# -- what only the pool's store does ------------------------------------------------------------


def test_a_statement_error_in_a_batch_should_undo_only_its_unit(pg_url, stores):
    s = open_pg(pg_url, stores)
    s.vm("a")
    with s.batch():
        with s.savepoint():
            s.enqueue("a", "kept", "1", True)
        with pytest.raises(StoreError) as e, s.savepoint():
            s._run("SELECT 1 / 0")
        assert e.value.message == "the pool database failed: division by zero"
        with s.savepoint():
            s.enqueue("a", "kept too", "2", True)
    assert [r.key for r in s.outbox("a")] == ["kept", "kept too"]


def test_bridges_starting_at_once_should_make_the_schema_once(pg_url, stores):
    barrier = threading.Barrier(3)
    outcomes = []

    def start(host):
        barrier.wait()
        try:
            outcomes.append(PgStore(pg_url, host, STORE_KEY))
        except Exception as e:  # noqa: BLE001 - reported below
            outcomes.append(e)

    threads = [threading.Thread(target=start, args=("hv%d" % i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stores.extend(o for o in outcomes if isinstance(o, PgStore))
    assert [type(o) for o in outcomes] == [PgStore] * 3, outcomes
    outcomes[0].vm("web1")
    assert [v.name for v in outcomes[2].vms()] == ["web1"]


def test_a_claim_should_hold_against_a_live_owner_unless_forced(pg_url, stores):
    a, b = open_pg(pg_url, stores, "hv1"), open_pg(pg_url, stores, "hv2")
    a.register_host("https://hv1", 15)
    b.register_host("https://hv2", 15)
    a.vm("web1")
    assert a.placement("web1") is None
    assert a.claim("web1") == 1 and a.held("web1") == 1
    assert b.claim("web1") is None and b.held("web1") is None
    p = b.placement("web1")
    assert (p.host, p.fence, p.state, p.url, p.alive) == ("hv1", 1, "running", "https://hv1", True)
    assert a.claim("web1") == 2  # its own owner may claim again: a new fence
    assert b.claim("web1", force=True) == 3
    assert b.placements()["web1"].host == "hv2"
    assert [(h.host, h.alive) for h in a.hosts()] == [("hv1", True), ("hv2", True)]


def test_a_host_whose_heartbeat_is_stale_should_lose_its_vms(pg_url, stores):
    a, b = open_pg(pg_url, stores, "hv1"), open_pg(pg_url, stores, "hv2")
    a.register_host("https://hv1", 15)
    b.register_host("https://hv2", 1.0)  # b judges others with a short lease
    a.vm("web1")
    a.claim("web1")
    assert b.claim("web1") is None
    wait_for(lambda: not b.placement("web1").alive, what="hv1's heartbeat to go stale")
    a.heartbeat()
    assert b.claim("web1") is None  # alive again
    wait_for(lambda: not b.placement("web1").alive, what="hv1's heartbeat to go stale")
    assert b.claim("web1") == 2
    assert a.held("web1") == 1  # a has not heard yet


def test_a_stale_fence_should_deliver_nothing_and_remove_nothing(pg_url, stores):
    a = open_pg(pg_url, stores, "hv1", live=True)
    b = open_pg(pg_url, stores, "hv2", live=True)
    a.vm("web1")
    with pytest.raises(Fenced):
        a.deliverable("web1")  # never claimed
    assert a.claim("web1") == 1
    b.enqueue("web1", "k1", "v1", True)
    b.enqueue("web1", "k2", "v2", True)
    assert [r.seq for r in a.deliverable("web1")] == [1]
    assert b.claim("web1", force=True) == 2
    with pytest.raises(Fenced) as e:
        a.finish("web1", [1], "delivered")
    assert e.value.code == "not_owner" and e.value.vm == "web1"
    assert a.held("web1") is None  # forgotten: the bridge stops delivering
    assert [r.seq for r in a.outbox("web1")] == [1, 2]
    with pytest.raises(Fenced):
        a.deliverable("web1")
    with pytest.raises(Fenced):
        a.finish("web1", [1], "failed")
    # Withdrawing and other outcomes need no fence: any bridge may cancel.
    a.finish("web1", [2], "refused")
    assert [r.seq for r in b.outbox("web1")] == [1]
    # The new owner delivers.
    assert [r.seq for r in b.deliverable("web1")] == [1]
    b.finish("web1", [1], "delivered")
    assert b.deliverable("web1") == []
    # A claim found stale at deliverable() is forgotten too.
    assert a.claim("web1", force=True) == 3
    assert b.held("web1") == 2
    with pytest.raises(Fenced):
        b.deliverable("web1")
    assert b.held("web1") is None


def test_finish_next_should_record_the_outcome_and_read_the_next_row_in_one_go(backend):
    s = backend()
    add_vm(s, "a")
    for i in range(3):
        s.enqueue("a", "k%d" % i, "v%d" % i, i != 1)  # the second one log=no
    assert [(r.seq, r.value) for r in s.finish_next("a", [1], "delivered")] == [(2, "v1")]
    assert [r.seq for r in s.outbox("a")] == [2, 3]
    withdrawn = s.withdraw("a", [2], "cancelled", written=2)
    assert withdrawn == ([], [2])
    # Row 2 is withdrawn in flight: not the next to deliver, as deliverable() says too.
    assert [r.seq for r in s.finish_next("a", [], "failed")] == [3]
    assert [r.seq for r in s.finish_next("a", [3], "failed")] == []
    assert [r[5] for r in s.audit("a")][-1] == "delivered" and s.audit("a")[0][5] == "failed"
    with pytest.raises(ValueError):
        s.finish_next("a", [2], "refused")  # not a delivery's outcome
    assert [r.seq for r in s.outbox("a", withdrawn=True)] == [2]


def test_finish_next_with_a_stale_fence_should_remove_and_read_nothing(pg_url, stores):
    a = open_pg(pg_url, stores, "hv1", live=True)
    b = open_pg(pg_url, stores, "hv2", live=True)
    a.vm("web1")
    with pytest.raises(Fenced):
        a.finish_next("web1", [], "delivered")  # never claimed
    assert a.claim("web1") == 1
    b.enqueue("web1", "k1", "v1", True)
    b.enqueue("web1", "k2", "v2", True)
    assert [r.seq for r in a.deliverable("web1")] == [1]
    assert b.claim("web1", force=True) == 2
    with pytest.raises(Fenced):
        a.finish_next("web1", [1], "delivered")
    assert a.held("web1") is None
    assert [r.seq for r in b.outbox("web1")] == [1, 2]
    assert [r.seq for r in b.finish_next("web1", [1], "delivered")] == [2]


def test_a_delivery_in_progress_should_hold_off_a_claim_until_it_commits(pg_url, stores):
    a, b = open_pg(pg_url, stores, "hv1"), open_pg(pg_url, stores, "hv2")
    a.register_host("https://hv1", 15)
    a.vm("web1")
    a.claim("web1")
    a.enqueue("web1", "k", "v", True)
    with a.batch():
        a.finish("web1", [1], "delivered")
        # b's forced claim waits on the fence's row lock: with a short lock timeout it gives up.
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SET lock_timeout = 100")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute("UPDATE placement SET fence = fence + 1 WHERE vm = 'web1'")
    assert b.claim("web1", force=True) == 2
    assert a.outbox("web1") == []


def test_release_should_be_done_by_the_holder_only(pg_url, stores):
    a = open_pg(pg_url, stores, "hv1", live=True)
    b = open_pg(pg_url, stores, "hv2", live=True)
    a.vm("web1")
    assert not a.release("web1")  # holds nothing
    a.claim("web1")
    assert not b.release("web1")
    assert a.mark_migrating("web1") and b.placement("web1").state == "migrating"
    assert not b.mark_migrating("web1")
    assert a.release("web1") and a.held("web1") is None
    p = b.placement("web1")
    assert (p.host, p.fence, p.state, p.alive) == (None, 1, "released", False)
    assert b.claim("web1") == 2  # nobody owns it: anyone may claim
    a.claim("web1", force=True)
    assert not b.release("web1")  # b's fence is stale
    assert a.placement("web1").host == "hv1"


def test_release_dead_should_free_the_vms_of_silent_hosts_only(pg_url, stores):
    a, b = open_pg(pg_url, stores, "hv1"), open_pg(pg_url, stores, "hv2")
    a.register_host("https://hv1", 15)
    b.register_host("https://hv2", 0.3)
    for vm in ("web1", "web2", "web3"):
        a.vm(vm)
    a.claim("web1")
    a.claim("web2")
    b.claim("web3")
    assert b.release_dead() == []
    watcher = listen(pg_url, PLACEMENT_CHANNEL)
    with watcher:
        # Both go stale; b releases a's VMs, never its own.
        wait_for(lambda: not b.placement("web1").alive, what="hv1's heartbeat to go stale")
        wait_for(lambda: not b.placement("web3").alive, what="hv2's heartbeat to go stale")
        assert b.release_dead() == ["web1", "web2"]
        assert sorted(notifications(watcher, 2)) == [
            (PLACEMENT_CHANNEL, "web1 - 1"),
            (PLACEMENT_CHANNEL, "web2 - 1"),
        ]
    placements = b.placements()
    assert [placements[v].host for v in ("web1", "web2", "web3")] == [None, None, "hv2"]
    assert placements["web1"].state == "released"
    with pytest.raises(Fenced):
        a.finish("web1", [1], "delivered")


def test_an_enqueue_by_another_bridge_should_wake_the_owner_at_commit(pg_url, stores):
    a, b = open_pg(pg_url, stores, "hv1"), open_pg(pg_url, stores, "hv2")
    a.register_host("https://hv1", 15)
    wake = channel_for_host("hv1")
    for vm in ("web1", "web2", "web3"):
        a.vm(vm)
    with listen(pg_url, wake, PLACEMENT_CHANNEL) as watcher:
        assert a.claim("web1") == 1 and a.claim("web2") == 1
        assert notifications(watcher, 2) == [
            (PLACEMENT_CHANNEL, "web1 hv1 1"),
            (PLACEMENT_CHANNEL, "web2 hv1 1"),
        ]
        b.enqueue("web1", "k", "v", True)
        assert notifications(watcher) == [(wake, "web1")]
        b.enqueue("web2", "k", "secret", False, idempotency=("i", "d"))
        assert notifications(watcher) == [(wake, "web2")]
        a.enqueue("web1", "k", "v", True)  # the owner's own send: no wake-up
        b.enqueue("web3", "k", "v", True)  # nobody owns it: nobody to wake
        with b.batch():
            with b.savepoint():
                b.enqueue("web1", "k", "v", True)
            assert notifications(watcher, timeout=0.3) == []  # nothing before COMMIT
            with pytest.raises(RuntimeError), b.savepoint():
                b.enqueue("web2", "k", "v", True)
                raise RuntimeError("undone, and its wake-up with it")
        assert notifications(watcher, 2, timeout=1.0) == [(wake, "web1")]
        a.release("web1")
        assert notifications(watcher) == [(PLACEMENT_CHANNEL, "web1 - 1")]


def test_a_host_channel_should_be_a_safe_stable_identifier():
    names = ["hv1", "HV1", "a host; DROP TABLE vms", "h\u00f4te", "x" * 300]
    channels = [channel_for_host(n) for n in names]
    assert len(set(channels)) == len(names)
    assert channels == [channel_for_host(n) for n in names]
    for c in channels:
        assert c.startswith("ovmd_host_") and len(c) == 34 and c.replace("_", "").isalnum()
        assert c == c.lower()


# -- log=no values at rest ----------------------------------------------------------------------


def wal_bytes(cluster):
    data = b""
    for path in sorted(glob.glob(os.path.join(cluster.data, "pg_wal", "0*"))):
        with open(path, "rb") as f:
            data += f.read()
    return data


def test_a_log_no_value_should_reach_neither_the_tables_nor_the_wal(
    pg_url, stores, postgres_server
):
    s = open_pg(pg_url, stores)
    s.vm("web1")
    s.claim("web1")
    secret = "secret-%s" % uuid.uuid4().hex
    plain = "plain-%s" % uuid.uuid4().hex
    s.enqueue("web1", "password", secret, False)
    s.enqueue("web1", "motd", plain, True)
    s.save_mirror(
        "web1", [MirrorRow("password", secret, 1.0, "host", True)], [], False, None, None, None
    )
    with psycopg.connect(pg_url) as conn:
        stored = b"".join(
            bytes(v) for (v,) in conn.execute("SELECT value FROM outbox ORDER BY seq")
        )
        everything = conn.execute(
            "SELECT concat((SELECT string_agg(t::text, '') FROM outbox t),"
            " (SELECT string_agg(t::text, '') FROM audit t),"
            " (SELECT string_agg(t::text, '') FROM mirror t))"
        ).fetchone()[0]
    assert plain.encode() in stored  # the check can see a value
    assert secret.encode() not in stored
    assert secret.encode().hex() not in everything and plain.encode().hex() in everything
    wal = wal_bytes(postgres_server)  # every commit above was flushed to the WAL
    assert plain.encode() in wal
    assert secret.encode() not in wal
    assert [r.value for r in s.outbox("web1")] == [secret, plain]


def test_a_sealed_value_should_open_only_in_its_own_row_with_the_pool_key(pg_url, stores):
    s = open_pg(pg_url, stores)
    s.vm("web1")
    s.enqueue("web1", "password", "one", False)
    s.enqueue("web1", "password", "two", False)
    other = PgStore(pg_url, "hv2", PoolKey(os.urandom(32)))
    stores.append(other)
    with pytest.raises(StoreError) as e:
        other.outbox("web1")
    assert "cannot be decrypted" in e.value.message and "one" not in e.value.message
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a ciphertext moved to another row
        conn.execute(
            "UPDATE outbox SET value = (SELECT value FROM outbox WHERE seq = 1) WHERE seq = 2"
        )
    assert s.outbox("web1", limit=1)[0].value == "one"
    with pytest.raises(StoreError):
        s.outbox("web1")


# -- faults ------------------------------------------------------------------------------------


def test_an_unreachable_database_at_start_should_be_one_line_without_the_password(tmp_path):
    url = "postgresql://ovmd:hunter2@/ovmd?host=%s&port=55432" % tmp_path
    with pytest.raises(StoreUnavailable) as e:
        PgStore(url, "hv1", STORE_KEY)
    message = e.value.message
    assert message.startswith("cannot reach the pool database at user=ovmd dbname=ovmd host=")
    assert "hunter2" not in message and "\n" not in message
    assert e.value.code == "store_unavailable"
    assert redact("postgresql://db.example/ovmd") == "postgresql://db.example/ovmd"
    assert "hunter2" not in redact(url) and "password" not in redact(url)
    with pytest.raises(StoreError) as e:
        PgStore("postgresql://ovmd:hunter2@db/ovmd?nonsense=1", "hv1", STORE_KEY)
    assert "hunter2" not in e.value.message


def test_a_long_lock_wait_should_end_in_store_unavailable_and_keep_the_connection(pg_url, stores):
    # The url's own options come after the store's: a short lock_timeout for the test.
    s = open_pg(pg_url + " options='-c lock_timeout=200'", stores)
    s.vm("web1")
    with psycopg.connect(pg_url) as other:
        other.execute("SELECT 1 FROM vms WHERE name = 'web1' FOR UPDATE")
        with pytest.raises(StoreUnavailable) as e:
            s.enqueue("web1", "k", "v", True)
        assert e.value.message.startswith("the pool database did not answer in time: ")
        other.rollback()
    assert s.enqueue("web1", "k", "v", True).seq == 1


@contextlib.contextmanager
def vm_b_locked(pg_url, stores):
    """A store with VMs a, b and c, whose row of b another session holds meanwhile: a write to
    b times out (lock_timeout 200 ms). After the block, how many mirror rows each VM has."""
    s = open_pg(pg_url + " options='-c lock_timeout=200'", stores)
    for vm in ("a", "b", "c"):
        s.vm(vm)
    counts = []
    with psycopg.connect(pg_url) as other:
        other.execute("SELECT 1 FROM vms WHERE name = 'b' FOR UPDATE")
        yield s, counts
        other.rollback()
    counts += [(vm, len(s.mirror(vm))) for vm in ("a", "b", "c")]


MIRROR_ROW = MirrorRow("k", "v", 1.0, "guest", False)


def test_a_write_that_fails_directly_in_a_batch_should_undo_only_itself(pg_url, stores):
    # As the bridge's flush of every VM's mirror: one batch, no savepoint of the caller's.
    with vm_b_locked(pg_url, stores) as (s, counts), s.batch():
        s.save_mirror("a", [MIRROR_ROW], [], False, 1.0, None, None)
        with pytest.raises(StoreUnavailable):
            s.save_mirror("b", [MIRROR_ROW], [], False, 1.0, None, None)
        s.save_mirror("c", [MIRROR_ROW], [], False, 1.0, None, None)
    assert counts == [("a", 1), ("b", 0), ("c", 1)]


def test_mirrors_saved_at_once_should_keep_the_others_when_one_vm_s_save_fails(pg_url, stores):
    with vm_b_locked(pg_url, stores) as (s, counts):
        saves = [MirrorSave(vm, [MIRROR_ROW], [], False, 1.0, None, None) for vm in "abc"]
        failed = s.save_mirrors(saves)
    assert list(failed) == ["b"] and isinstance(failed["b"], StoreUnavailable)
    assert counts == [("a", 1), ("b", 0), ("c", 1)]


def test_calls_should_fail_while_the_database_is_down_and_work_once_it_is_back(
    pg_url, stores, postgres_server
):
    s = open_pg(pg_url, stores)
    s.vm("web1")
    s.enqueue("web1", "k", "v", True)
    postgres_server.stop()
    try:
        for call in (
            lambda: s.queued("web1"),
            lambda: s.enqueue("web1", "k", "v", True),
            lambda: s.claim("web1"),
            s.heartbeat,
        ):
            with pytest.raises(StoreUnavailable) as e:
                call()
            assert e.value.message.startswith("the pool database is unreachable: ")
            assert "\n" not in e.value.message
    finally:
        postgres_server.start()

    def answers():
        # A connect failed within the last RECONNECT_PAUSE: until it passes, calls fail at once
        # (an unreachable host must not cost every call a connect timeout).
        try:
            return s.queued("web1") == 1
        except StoreUnavailable:
            return False

    wait_for(answers, 10, what="the store to connect again")
    assert s.enqueue("web1", "k", "v", True).seq == 2


def test_a_batch_cut_by_an_outage_should_commit_nothing(pg_url, stores, postgres_server):
    s = open_pg(pg_url, stores)
    s.vm("web1")
    committer = GroupCommit(s)

    def cut(db):
        postgres_server.kill()
        try:
            return s.enqueue("web1", "second", "v", True)
        finally:
            postgres_server.start()  # back before the third unit runs

    async def main():
        first = committer.submit(lambda db: s.enqueue("web1", "first", "v", True))
        second = committer.submit(cut)
        third = committer.submit(lambda db: s.enqueue("web1", "third", "v", True))
        return await asyncio.gather(first, second, third, return_exceptions=True)

    results = asyncio.run(main())
    # The first unit succeeded but its COMMIT never came; the third did not run on a new
    # connection (it would have committed alone).
    assert all(isinstance(r, (CommitFailed, StoreUnavailable)) for r in results), results
    assert committer.commits == 0 and committer.failed == 1
    assert s.queued("web1") == 0
    assert s.enqueue("web1", "after", "v", True).seq == 1


def test_connections_past_descriptor_1024_should_be_kept_from_call_to_call(pg_url, stores):
    # A bridge with a thousand guests holds its database connections past descriptor 1024,
    # where select() cannot look: the check for a connection the server closed must not take
    # every such connection for closed (and connect again at every call).
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip("the hard limit of open files is below 1400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        s = open_pg(pg_url, stores)
        s.vm("web1")
        s.claim("web1")
        conn = s._conn
        assert conn.fileno() >= 1024
        s.enqueue("web1", "k", "v", True)
        s.run_prepared([s.prepare_enqueue("web1", "k", "v", True)]).result()
        committer = s._commit_conn
        assert committer.fileno() >= 1024
        s.run_prepared([s.prepare_enqueue("web1", "k", "v", True)]).result()
        assert [r.seq for r in s.outbox("web1")] == [1, 2, 3]
        assert (s._conn, s._commit_conn) == (conn, committer)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
