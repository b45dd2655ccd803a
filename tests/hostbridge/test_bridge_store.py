"""hostbridge.store: the SQLite file's outbox, audit, mirror, and what it keeps of a secret."""

import os
import sqlite3

import pytest

from hostbridge.store import AUDIT_VALUE_MAX, MirrorRow, Store


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "bridge.sqlite3")


def file_bytes(path):
    out = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                out += f.read()
    return out


def test_it_should_give_each_vm_a_random_epoch_kept_across_reopen(db_path):
    s = Store(db_path)
    a, b = s.vm("a", "pty:/x", "flag"), s.vm("b")
    assert a.epoch != b.epoch and len(a.epoch) == 16
    s.close()
    s = Store(db_path)
    assert s.vm("a").epoch == a.epoch
    assert s.vm("a").channel == "pty:/x"


def test_it_should_number_outbox_rows_in_order_and_survive_reopen(db_path):
    s = Store(db_path)
    s.vm("a")
    seqs = [s.enqueue("a", "k%d" % i, "v%d" % i, True).seq for i in range(3)]
    s.enqueue("a", "gone", None, True)
    assert seqs == [1, 2, 3]
    s._db.close()  # no checkpoint: as after kill -9
    s = Store(db_path)
    rows = s.outbox("a", limit=10)
    assert [(r.seq, r.key, r.value) for r in rows] == [
        (1, "k0", "v0"),
        (2, "k1", "v1"),
        (3, "k2", "v2"),
        (4, "gone", None),
    ]
    assert s.queued("a") == 4
    s.finish("a", [1, 2], "delivered")
    assert [r.seq for r in s.outbox("a")] == [3, 4]
    assert s.enqueue("a", "k", "v", True).seq == 5  # numbers are never reused


def test_it_should_record_outcomes_in_the_audit_newest_first(db_path):
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "k1", "v1", True)
    s.enqueue("a", "k2", "v2", True)
    s.finish("a", [1], "delivered")
    s.audit_refused("a", "k3", "v3", False)
    rows = s.audit("a")
    assert [(r[2], r[5]) for r in rows] == [
        ("k3", "refused"),
        ("k2", "queued"),
        ("k1", "delivered"),
    ]
    assert rows[2][6] == "v1" and rows[2][3] == 2
    assert rows[0][6] is None


def test_it_should_truncate_an_audited_value_to_1024_bytes_on_a_character_boundary(db_path):
    s = Store(db_path)
    s.vm("a")
    value = "é" * 1000  # 2,000 bytes
    s.enqueue("a", "k", value, True)
    (row,) = s.audit("a")
    assert row[3] == 2000
    assert len(row[6].encode("utf-8")) <= AUDIT_VALUE_MAX and value.startswith(row[6])


@pytest.mark.parametrize("size", [40, 5000])
def test_it_should_leave_no_trace_of_a_log_off_value_once_delivered(db_path, size):
    token = os.urandom(8).hex()  # 16 characters found in any 32-byte piece of the value
    secret = (token * (size // 16 + 1))[:size]
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "pw", secret, False)
    s.enqueue("a", "other", "public-value", True)
    assert token.encode() in file_bytes(db_path)  # it is on disk while queued
    assert s.audit("a")[1][6] is None
    s.finish("a", [1], "delivered")
    data = file_bytes(db_path)
    assert token.encode() not in data
    assert b"public-value" in data
    s.close()
    assert token.encode() not in file_bytes(db_path)


def test_it_should_store_a_hidden_mirror_row_without_its_value(db_path):
    s = Store(db_path)
    s.vm("a")
    s.save_mirror(
        "a",
        [
            MirrorRow("pw", "hunter2-secret", 1.0, "host", True),
            MirrorRow("k", "visible", 2.0, "guest", False),
        ],
        [],
        True,
        5.0,
        "g",
        3,
    )
    s.close()
    assert b"hunter2-secret" not in file_bytes(db_path)
    s = Store(db_path)
    rows = {r.key: r for r in s.mirror("a")}
    assert rows["pw"].value is None and rows["pw"].hidden
    assert rows["k"].value == "visible"
    vm = s.vm("a")
    assert (vm.gid, vm.gseq, vm.last_seen) == ("g", 3, 5.0)


def test_it_should_remember_keys_sent_with_log_off(db_path):
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "pw", "x", False)
    assert s.hidden("a") == {"pw"}
    assert s.secret_pending("a", "pw", 0) and not s.secret_pending("a", "pw", 1)
    s.save_mirror("a", [], [], False, None, None, None, unhidden=["pw"])
    assert s.hidden("a") == set()


def test_a_batch_should_commit_every_write_once_and_a_failed_write_should_undo_only_itself(db_path):
    s = Store(db_path)
    s.vm("a")
    s.vm("b")
    with s.batch():
        s.save_mirror("a", [MirrorRow("k", "from a", 1.0, "guest", False)], [], True, 5.0, "g", 1)
        with pytest.raises(sqlite3.Error):
            # A key sqlite3 cannot bind fails after the savepoint began, inside the batch.
            s.save_mirror(
                "b", [MirrorRow(object(), "x", 1.0, "guest", False)], [], True, 5.0, "g", 1
            )
        s.save_mirror("b", [MirrorRow("k2", "from b", 2.0, "guest", False)], [], True, 6.0, "g", 2)
    s._db.close()  # no checkpoint: as after kill -9
    s = Store(db_path)
    assert [(r.key, r.value) for r in s.mirror("a")] == [("k", "from a")]
    assert [(r.key, r.value) for r in s.mirror("b")] == [("k2", "from b")]


def audit_keys(s, vm):
    return [r[2] for r in reversed(s.audit(vm, limit=1000))]


def test_the_audit_should_keep_exactly_the_newest_n_rows_of_each_vm_however_they_interleave(
    db_path,
):
    s = Store(db_path, audit_keep=5)
    s.vm("busy")
    s.vm("quiet")
    for i in range(40):
        s.enqueue("busy", "b%d" % i, "v", True)
        if i % 4 == 0:
            s.audit_refused("quiet", "q%d" % i, "v", True)
    assert audit_keys(s, "busy") == ["b%d" % i for i in range(35, 40)]
    assert audit_keys(s, "quiet") == ["q%d" % i for i in (20, 24, 28, 32, 36)]
    # The outbox is not the audit: every queued message is still there.
    assert s.queued("busy") == 40


def test_the_audit_should_prune_a_vm_with_rows_from_before_a_restart_to_the_new_limit(db_path):
    s = Store(db_path)
    s.vm("a")
    for i in range(6):
        s.audit_refused("a", "k%d" % i, "v", True)
    s.close()
    s = Store(db_path, audit_keep=3)
    assert len(s.audit("a")) == 6  # nothing is pruned until the VM's next audit row
    s.audit_refused("a", "k6", "v", True)
    assert audit_keys(s, "a") == ["k4", "k5", "k6"]


def test_the_audit_should_count_each_vm_once_not_at_every_insert(db_path):
    s = Store(db_path, audit_keep=4)
    s.vm("a")
    s.audit_refused("a", "first", "v", True)
    statements = []
    s._db.set_trace_callback(statements.append)
    for i in range(20):
        s.audit_refused("a", "k%d" % i, "v", True)
    s._db.set_trace_callback(None)
    assert not [q for q in statements if "COUNT" in q.upper()]
    assert len(s.audit("a")) == 4


def test_a_rolled_back_audit_row_should_not_make_the_audit_keep_fewer_rows(db_path):
    s = Store(db_path, audit_keep=3)
    s.vm("a")
    for i in range(2):
        s.audit_refused("a", "k%d" % i, "v", True)
    with pytest.raises(RuntimeError):
        with s.batch():
            s.audit_refused("a", "undone", "v", True)
            raise RuntimeError("the batch fails after the audit row")
    s.audit_refused("a", "k2", "v", True)
    assert audit_keys(s, "a") == ["k0", "k1", "k2"]
    s.audit_refused("a", "k3", "v", True)
    assert audit_keys(s, "a") == ["k1", "k2", "k3"]


def secret_of(size):
    token = os.urandom(8).hex()  # 16 characters found in any 32-byte piece of the value
    return token.encode(), (token * (size // 16 + 1))[:size]


@pytest.mark.parametrize("size", [40, 8192])
def test_a_cancelled_log_off_value_should_leave_no_trace_in_the_database_files(db_path, size):
    token, secret = secret_of(size)
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "before", "public-before", True)
    s.enqueue("a", "pw", secret, False)
    s.enqueue("a", "after", "public-after", True)
    assert token in file_bytes(db_path)  # on disk while queued
    assert s.withdraw("a", [2], "cancelled", written=0) == ([2], [])
    data = file_bytes(db_path)
    assert token not in data
    assert b"public-before" in data and b"public-after" in data
    assert [r.seq for r in s.outbox("a")] == [1, 3] and s.queued("a") == 2
    assert [(r[2], r[5], r[6]) for r in s.audit("a")][1] == ("pw", "cancelled", None)
    s.close()
    assert token not in file_bytes(db_path)


def test_cancelling_every_message_should_empty_the_vms_outbox_and_audit_each(db_path):
    s = Store(db_path)
    s.vm("a")
    s.vm("b")
    for i in range(3):
        s.enqueue("a", "k%d" % i, "v", True)
    s.enqueue("b", "other", "v", True)
    assert s.withdraw("a", None, "cancelled", written=0) == ([1, 2, 3], [])
    assert s.queued("a") == 0 and s.queued_counts() == {"b": 1}
    assert [r[5] for r in s.audit("a")] == ["cancelled"] * 3
    assert s.withdraw("a", [1], "cancelled", written=0) == ([], [])  # gone: nothing to do


@pytest.mark.parametrize("size", [40, 8192])
def test_a_message_withdrawn_in_flight_should_lose_its_value_but_keep_its_place(db_path, size):
    token, secret = secret_of(size)
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "pw", secret, False)
    s.enqueue("a", "next", "v", True)
    # Seq 1 was written to the guest, not acknowledged: the guest may hold it.
    assert s.withdraw("a", None, "cancelled", written=1) == ([2], [1])
    assert token not in file_bytes(db_path)
    assert s.outbox("a") == [] and s.queued("a") == 0 and s.queued_counts() == {}
    (row,) = s.outbox("a", withdrawn=True)
    assert (row.seq, row.value, row.withdrawn) == (1, None, "cancelled")
    assert [r[5] for r in reversed(s.audit("a"))] == ["cancelled_in_flight", "cancelled"]
    # Withdrawn again (an expiry, a second cancel): still in flight, first outcome kept.
    assert s.withdraw("a", [1], "expired", written=1) == ([], [1])
    assert s.outbox("a", withdrawn=True)[0].withdrawn == "cancelled"
    s.finish("a", [1], "cancelled")  # the guest's hello showed it never arrived
    assert s.outbox("a", withdrawn=True) == []
    assert s.audit("a")[1][5] == "cancelled"


def test_expired_should_name_the_waiting_rows_past_their_expiry(db_path):
    s = Store(db_path)
    s.vm("a")
    s.vm("b")
    s.enqueue("a", "old", "v", True, expires=100.0)
    s.enqueue("a", "never", "v", True)
    s.enqueue("a", "later", "v", True, expires=300.0)
    s.enqueue("b", "old", "v", True, expires=150.0)
    s.enqueue("b", "flying", "v", True, expires=50.0)
    s.withdraw("b", [2], "cancelled", written=2)
    assert s.expired(200.0) == {"a": [1], "b": [1]}
    assert s.expired(99.0) == {}
    assert s.outbox("a")[2].expires == 300.0 and s.outbox("a")[1].expires is None


def test_a_database_from_before_expiry_should_gain_its_columns_and_keep_its_outbox(db_path):
    old = sqlite3.connect(db_path)
    old.executescript(
        "CREATE TABLE outbox (vm TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, "
        "value TEXT, log INTEGER NOT NULL, created REAL NOT NULL, audit_id INTEGER, "
        "PRIMARY KEY (vm, seq));"
        "INSERT INTO outbox VALUES ('a', 1, 'k', 'v', 1, 1.0, NULL);"
    )
    old.commit()
    old.close()
    s = Store(db_path)
    (row,) = s.outbox("a")
    assert (row.seq, row.key, row.expires, row.withdrawn) == (1, "k", None, None)
    s.close()
    s = Store(db_path)  # a second open adds nothing twice
    assert s.queued("a") == 1


def test_an_idempotency_key_should_be_committed_with_its_message_and_survive_kill_9(db_path):
    s = Store(db_path)
    s.vm("a")
    row = s.enqueue("a", "k", "v", True, idempotency=("key-1", "digest-1"))
    s._db.close()  # no checkpoint: as after kill -9
    s = Store(db_path)
    found = s.idempotent("a", "key-1")
    assert (found.digest, found.seq, found.outcome) == ("digest-1", row.seq, "queued")
    assert s.idempotent("b", "key-1") is None and s.idempotent("a", "key-2") is None
    s.finish("a", [row.seq], "delivered")
    assert s.idempotent("a", "key-1").outcome == "delivered"


def test_a_refused_message_should_forget_its_idempotency_key_as_nothing_was_kept(db_path):
    s = Store(db_path)
    s.vm("a")
    failed = s.enqueue("a", "k", "v", True, idempotency=("failed", "d"))
    refused = s.enqueue("a", "k", "v", True, idempotency=("refused", "d"))
    s.finish("a", [failed.seq], "failed")
    s.finish("a", [refused.seq], "refused")
    assert s.idempotent("a", "failed").outcome == "failed"
    assert s.idempotent("a", "refused") is None


def test_idempotency_keys_should_be_forgotten_beyond_their_count_and_age_per_vm(db_path):
    s = Store(db_path, idempotency_keep=3, idempotency_ttl=100.0)
    s.vm("a")
    s.vm("b")
    s.enqueue("b", "k", "v", True, ts=1000.0, idempotency=("b-old", "d"))
    for i in range(5):
        s.enqueue("a", "k", "v", True, ts=1000.0 + i, idempotency=("a%d" % i, "d"))
    kept = {k for (k,) in s._db.execute("SELECT key FROM idempotency WHERE vm='a'")}
    assert kept == {"a2", "a3", "a4"}  # the VM's last 3 messages
    assert s.idempotent("b", "b-old", now=1050.0) is not None  # another VM's are its own
    # Too old to answer at once, and pruned at the VM's next keyed send.
    assert s.idempotent("a", "a4", now=1105.0) is None
    s.enqueue("a", "k", "v", True, ts=1200.0, idempotency=("new", "d"))
    assert [k for (k,) in s._db.execute("SELECT key FROM idempotency WHERE vm='a'")] == ["new"]


def test_a_database_from_before_idempotency_keys_should_gain_their_table(db_path):
    s = Store(db_path)
    s.vm("a")
    s._db.execute("DROP TABLE idempotency")
    s.close()
    s = Store(db_path)
    s.enqueue("a", "k", "v", True, idempotency=("key", "d"))
    assert s.idempotent("a", "key").seq == 1


@pytest.mark.parametrize("size", [40, 8192])
def test_a_log_off_value_delivered_inside_a_batch_should_leave_no_trace_once_it_committed(
    db_path, size
):
    # The WAL cannot be folded while the batch's transaction is open: it is, after its COMMIT.
    token, secret = secret_of(size)
    s = Store(db_path)
    s.vm("a")
    s.enqueue("a", "pw", secret, False)
    s.enqueue("a", "other", "public-value", True)
    with s.batch():
        s.finish("a", [1], "delivered")
        s.enqueue("a", "later", "public-later", True)
    data = file_bytes(db_path)
    assert token not in data
    assert b"public-value" in data and b"public-later" in data
    assert [r.seq for r in s.outbox("a")] == [2, 3]


def test_a_failed_commit_should_leave_the_store_usable_and_keep_nothing_of_it(db_path):
    s = Store(db_path)
    s.vm("a")
    s._db.execute("PRAGMA foreign_keys=ON")
    s._db.executescript(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
    )
    with pytest.raises(sqlite3.IntegrityError):
        with s.batch() as db:
            s.enqueue("a", "lost", "v", True)
            db.execute("INSERT INTO child VALUES (1)")  # fails only at COMMIT
    assert not s._db.in_transaction
    assert s.enqueue("a", "kept", "v", True).seq == 1
    assert [r.key for r in s.outbox("a")] == ["kept"]
    assert [r[2] for r in s.audit("a")] == ["kept"]
