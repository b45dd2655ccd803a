"""hostbridge.groupcommit: concurrent sends share one transaction (one fsync), and nothing is
answered, or written to a guest, before its commit. First the committer over a real SQLite file,
then the bridge in-process with a real agent, then the bridge as a process (kill -9 included)."""

import asyncio
import json
import os
import signal
import socket
import sqlite3
import threading
from contextlib import closing

import pytest

from hostbridge.apiclient import ApiError, Client, parse_response
from hostbridge.groupcommit import CommitFailed, GroupCommit
from hostbridge.store import Store
from ovmproto.messages import Set
from tests.hostbridge.bridge_harness import BridgeProc, pty_config, running_bridge
from tests.support.agent import Agent
from tests.support.waiting import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "bridge.sqlite3"))
    for vm in ("a", "b"):
        s.vm(vm)
    yield s
    s.close()


def count_commits(store):
    """A list that gets one item per COMMIT the store's connection runs (its trace)."""
    commits = []
    store._db.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    return commits


def committed_outbox(path, vm):
    """(seq, key) of ``vm``'s outbox as another connection sees it: committed rows only."""
    with closing(sqlite3.connect(path, timeout=5)) as conn:
        return conn.execute("SELECT seq, key FROM outbox WHERE vm=? ORDER BY seq", (vm,)).fetchall()


def enqueue(store, vm, key):
    return lambda db: store.enqueue(vm, key, "value-of-" + key, True)


def add_deferred_constraint(store):
    """A table whose rows break a foreign key that is checked only at COMMIT: a unit that adds
    one makes its group's COMMIT fail, the way a full disk or an I/O error would."""
    store._db.execute("PRAGMA foreign_keys=ON")
    store._db.executescript(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
    )

    def orphan(db):
        db.execute("INSERT INTO child VALUES (1)")

    return orphan


# -- the committer over a real SQLite file ----------------------------------------------------


def test_concurrent_sends_should_share_one_commit_and_each_get_its_own_seq_in_order(store):
    commits = count_commits(store)

    async def main():
        committer = GroupCommit(store)
        units = [enqueue(store, vm, "%s%d" % (vm, i)) for i in range(10) for vm in ("a", "b")]
        rows = await asyncio.gather(*(committer.run(u) for u in units))
        return committer, rows

    committer, rows = asyncio.run(main())
    assert len(commits) == 1
    assert (committer.commits, committer.units) == (1, 20)
    assert [(r.vm, r.seq, r.key) for r in rows if r.vm == "a"] == [
        ("a", i + 1, "a%d" % i) for i in range(10)
    ]
    assert [r.seq for r in rows if r.vm == "b"] == list(range(1, 11))
    assert committed_outbox(store.path, "b") == [(i + 1, "b%d" % i) for i in range(10)]


def test_a_group_larger_than_its_cap_should_commit_in_transactions_of_that_size_in_order(store):
    commits = count_commits(store)

    async def main():
        committer = GroupCommit(store, max_units=4)
        units = [enqueue(store, "a", "k%d" % i) for i in range(10)]
        rows = await asyncio.gather(*(committer.run(u) for u in units))
        return committer, rows

    committer, rows = asyncio.run(main())
    assert len(commits) == 3  # 4 + 4 + 2
    assert (committer.commits, committer.units) == (3, 10)
    assert [r.seq for r in rows] == list(range(1, 11))
    assert committed_outbox(store.path, "a") == [(i + 1, "k%d" % i) for i in range(10)]


def test_with_grouping_off_each_send_should_commit_alone(store):
    commits = count_commits(store)

    async def main():
        committer = GroupCommit(store, enabled=False)
        await asyncio.gather(*(committer.run(enqueue(store, "a", "k%d" % i)) for i in range(5)))
        return committer

    committer = asyncio.run(main())
    assert len(commits) == 5
    assert (committer.commits, committer.units) == (5, 5)


def test_a_unit_that_raises_should_be_rolled_back_alone_and_its_sender_get_the_error(store):
    def half_done(db):
        store.enqueue("a", "half", "written-then-undone", True)
        raise ValueError("the unit fails after its first write")

    async def main():
        committer = GroupCommit(store)
        return await asyncio.gather(
            committer.run(enqueue(store, "a", "first")),
            committer.run(half_done),
            committer.run(enqueue(store, "nosuchvm", "x")),
            committer.run(enqueue(store, "a", "last")),
            return_exceptions=True,
        )

    first, failed, unknown, last = asyncio.run(main())
    assert isinstance(failed, ValueError) and isinstance(unknown, KeyError)
    # The failed unit's seq and audit row went with it: the next send took its number.
    assert (first.seq, last.seq) == (1, 2)
    assert committed_outbox(store.path, "a") == [(1, "first"), (2, "last")]
    assert [r[2] for r in store.audit("a")] == ["last", "first"]


def test_a_failed_commit_should_fail_every_unit_of_the_group_and_keep_nothing(store):
    orphan = add_deferred_constraint(store)

    async def main():
        committer = GroupCommit(store)
        failed = await asyncio.gather(
            committer.run(enqueue(store, "a", "lost1")),
            committer.run(orphan),
            committer.run(enqueue(store, "b", "lost2")),
            return_exceptions=True,
        )
        # The database stays usable: the next group commits.
        after = await committer.run(enqueue(store, "a", "after"))
        return committer, failed, after

    committer, failed, after = asyncio.run(main())
    assert [type(e) for e in failed] == [CommitFailed] * 3
    assert "FOREIGN KEY" in str(failed[0])
    assert (committer.failed, committer.commits) == (1, 1)
    assert committed_outbox(store.path, "a") == [(1, "after")]
    assert committed_outbox(store.path, "b") == []
    assert after.seq == 1 and [r[2] for r in store.audit("a")] == ["after"]
    assert store.audit("b") == []


def test_no_sender_should_be_answered_before_its_commit_is_visible_to_others(store):
    seen = []

    async def main():
        committer = GroupCommit(store)
        futs = [committer.submit(enqueue(store, "a", "k%d" % i)) for i in range(5)]
        for fut in futs:
            # Runs the moment the sender is answered: another connection must see the row.
            fut.add_done_callback(
                lambda f: seen.append((f.result().seq, f.result().key) in visible())
            )
        await asyncio.gather(*futs)

    def visible():
        return set(committed_outbox(store.path, "a"))

    asyncio.run(main())
    assert seen == [True] * 5


def test_a_sender_that_gave_up_before_the_flush_should_have_nothing_kept(store):
    async def main():
        committer = GroupCommit(store)
        gone = committer.submit(enqueue(store, "a", "abandoned"))
        kept = committer.submit(enqueue(store, "a", "kept"))
        gone.cancel()
        return await kept

    row = asyncio.run(main())
    assert row.seq == 1
    assert committed_outbox(store.path, "a") == [(1, "kept")]


# -- the bridge in-process, a real agent on a pty ----------------------------------------------


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


def with_agent(short_dir, body):
    """Run ``body(bridge, agent)`` with an in-process bridge and a synced real agent on vm1."""

    async def main():
        config = pty_config(str(short_dir), "vm1")
        with closing(Agent(os.path.join(str(short_dir), "vm1"))) as agent:
            async with running_bridge(config) as bridge:
                agent.start()
                await async_wait_for(
                    lambda: bridge.vm("vm1").agent == "connected", what="the agent synced"
                )
                await body(bridge, agent)

    asyncio.run(main())


def test_the_delivery_should_write_a_row_to_the_guest_only_once_it_is_committed(short_dir):
    async def body(bridge, agent):
        session = bridge.guest("vm1").session
        request = session.request
        db = bridge.config.db
        writes = []  # (seq, whether the row was committed, as another connection sees it)

        async def watched(make, timeout, collect=False, internal=False):
            msg = make(0)
            if isinstance(msg, Set) and msg.seq is not None:
                seen = (msg.seq, msg.key) in committed_outbox(db, "vm1")
                writes.append((msg.seq, seen and not bridge.store._db.in_transaction))
            return await request(make, timeout, collect, internal)

        session.request = watched
        # A burst of 20 sends that share a commit, then a stream of sends arriving while the
        # guest's delivery runs: every row it writes must be committed, not merely visible to
        # the bridge's own connection.
        sends = [bridge.send("vm1", "k%02d" % i, "v%d" % i) for i in range(20)]
        tasks = [asyncio.ensure_future(s) for s in sends]
        for i in range(20, 60):
            await asyncio.sleep(0.001)
            tasks.append(asyncio.ensure_future(bridge.send("vm1", "k%02d" % i, "v%d" % i)))
        results = await asyncio.gather(*tasks)
        assert [(r.outcome, r.seq) for r in results] == [("delivered", i + 1) for i in range(60)]
        assert writes == [(i + 1, True) for i in range(60)]
        # The first 20 sends shared one commit; each acknowledgement was a unit of its own.
        committer = bridge.committer
        assert committer.units == 120 and committer.commits <= 101
        assert guest_value(agent, "k59") == "v59"

    with_agent(short_dir, body)


def test_a_failed_commit_should_answer_no_send_and_send_nothing_to_the_guest(short_dir):
    async def body(bridge, agent):
        orphan = add_deferred_constraint(bridge.store)
        results = await asyncio.gather(
            bridge.send("vm1", "lost1", "x"),
            bridge.committer.run(orphan),
            bridge.send("vm1", "lost2", "y"),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [CommitFailed] * 3
        assert bridge.vm("vm1").queued == 0 and bridge.audit("vm1") == []
        after = await bridge.send("vm1", "after", "z")
        # The failed sends' numbers were never given out, and the guest saw neither of them.
        assert (after.outcome, after.seq) == ("delivered", 1)
        assert guest_value(agent, "after") == "z"
        assert guest_value(agent, "lost1") is None and guest_value(agent, "lost2") is None

    with_agent(short_dir, body)


def test_concurrent_sends_with_one_idempotency_key_should_make_one_message(short_dir):
    async def body(bridge, agent):
        # All four look the key up before any of them is committed: the first enqueues, the
        # others find its row inside the shared transaction and answer as retries of it.
        results = await asyncio.gather(
            *(bridge.send("vm1", "once", "v", idempotency_key="same") for _ in range(4))
        )
        assert (
            sorted((r.outcome, r.seq, r.replayed) for r in results)
            == [("delivered", 1, False)] + [("delivered", 1, True)] * 3
        )
        assert [a.outcome for a in bridge.audit("vm1")] == ["delivered"]
        assert guest_value(agent, "once") == "v"

    with_agent(short_dir, body)


# -- the bridge as a process -------------------------------------------------------------------


def post(vm, key, value, idempotency_key=None):
    body = json.dumps({"key": key, "value": value}).encode()
    head = (
        "POST /v1/vms/%s/messages HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nContent-Length: %d\r\n" % (vm, len(body))
    )
    if idempotency_key:
        head += "Idempotency-Key: %s\r\n" % idempotency_key
    return (head + "\r\n").encode() + body


def answer(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    status, body = parse_response(b"".join(chunks))
    return status, json.loads(body)


def test_sends_that_reach_a_busy_bridge_together_should_share_its_commits(short_dir):
    channel = os.path.join(str(short_dir), "ch")  # no agent: every send is answered "queued"
    with BridgeProc({"vm1": "pty:" + channel}) as bridge:
        bridge.wait_ready()
        api = Client(bridge.api_socket)
        before = api.health()
        socks = []
        # The bridge is stopped while 16 requests are written in full: when it runs again it
        # finds them all at once, as it would had they come while it was busy with an fsync.
        bridge.signal(signal.SIGSTOP)
        try:
            for i in range(16):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(bridge.api_socket)
                s.sendall(post("vm1", "k%02d" % i, "v%d" % i))
                socks.append(s)
        finally:
            bridge.signal(signal.SIGCONT)
        answers = []
        for s in socks:
            with s:
                answers.append(answer(s))
        assert {status for status, _ in answers} == {202}
        assert sorted(doc["seq"] for _, doc in answers) == list(range(1, 17))
        after = api.health()
        units = after["commit_units"] - before["commit_units"]
        commits = after["commits"] - before["commits"]
        assert units == 16 and 1 <= commits < 16
        # Each send's seq is its row's, and the audit lists them once each.
        by_key = {doc["key"]: doc["seq"] for _, doc in answers}
        rows = committed_outbox(bridge.db, "vm1")
        assert rows == sorted((seq, key) for key, seq in by_key.items())


def test_every_send_answered_before_kill_9_should_reach_the_guest_once_in_order(short_dir):
    """A burst of concurrent senders, each sending its messages one after the other, when the
    bridge is killed. Each message is an event (VMAPIEvent), so the guest keeps every one it
    applied, in the order it applied them: a message applied twice would show up twice."""
    channel = os.path.join(str(short_dir), "ch")
    db = os.path.join(str(short_dir), "db")
    threads, per_thread = 8, 40
    answered = {}  # value -> seq, for every send answered queued or delivered
    unanswered = []  # values whose send failed at the kill: committed or not, nobody knows
    unexpected = []  # any other answer
    lock = threading.Lock()
    stop = threading.Event()

    def sender(bridge, t):
        api = Client(bridge.api_socket, timeout=60)
        for i in range(per_thread):
            value = "t%d-%02d" % (t, i)
            try:
                doc = api.request(
                    "POST",
                    "/v1/vms/vm1/messages",
                    {"key": "VMAPIEvent", "value": value},
                    headers={"Idempotency-Key": value},
                )
            except ApiError:
                with lock:
                    unanswered.append(value)
                return
            with lock:
                if doc["outcome"] in ("queued", "delivered"):
                    answered[value] = doc["seq"]
                else:
                    unexpected.append(doc)
            if stop.is_set():
                return

    agent = Agent(channel, args=["--max-events", "1000"])
    with closing(agent):
        with BridgeProc({"vm1": "pty:" + channel}, db) as bridge:
            bridge.wait_ready()
            agent.start().wait_ready()
            api = Client(bridge.api_socket)
            wait_for(lambda: api.vm("vm1")["agent"] == "connected", what="the agent synced")
            workers = [threading.Thread(target=sender, args=(bridge, t)) for t in range(threads)]
            for w in workers:
                w.start()
            try:
                wait_for(lambda: len(answered) >= 60, timeout=60, what="60 sends answered")
                bridge.kill()  # SIGKILL, in the middle of the burst
            finally:
                stop.set()
                for w in workers:
                    w.join(timeout=90)
        assert unexpected == []
        assert len(answered) >= 60 and len(set(answered.values())) == len(answered)
        with BridgeProc({"vm1": "pty:" + channel}, db) as bridge:
            bridge.wait_ready()
            api = Client(bridge.api_socket)
            wait_for(lambda: api.vm("vm1")["agent"] == "connected", what="the agent synced again")
            # Every answered send is replayed under its key with the seq it was given; a send cut
            # off by the kill is either replayed (it had been committed) or made now, once.
            for value in sorted(answered) + sorted(unanswered):
                doc = api.send("vm1", "VMAPIEvent", value, idempotency_key=value)
                assert doc["outcome"] == "delivered", doc
                if value in answered:
                    assert (doc["seq"], doc["replayed"]) == (answered[value], True)
            wait_for(lambda: api.vm("vm1")["queued"] == 0, what="the outbox drained")
            events = [
                json.loads(line)["value"]
                for line in agent.ovmd("--events", "--json").stdout.splitlines()
            ]
    assert sorted(events) == sorted(set(answered) | set(unanswered))  # each exactly once
    # In order: the guest applied the answered ones by seq, and each sender's in its own order.
    in_guest = [v for v in events if v in answered]
    assert in_guest == sorted(answered, key=answered.get)
    for t in range(threads):
        mine = [v for v in events if v.startswith("t%d-" % t)]
        assert mine == sorted(mine)
