"""What a live query answers (docs/bridge.md, "What live means"), with real processes: the bridge
daemon, a real agent on a pty, `ovmd -p` in a shell loop in the guest and the host querying
through the bridge's API at the same time.

A synced agent's answer may come from the bridge's mirror of its keys: every answer must still be
a value the guest held, answers must never go backwards for one sequential querier, a host's own
send must be seen by its next query, and `fresh=true` (a round trip) must see every set that had
returned before the query was sent.
"""

import os
import subprocess
import threading

import pytest

from hostbridge.apiclient import ApiError, Client, path
from tests.hostbridge.bridge_harness import BridgeProc, agent_state, cli
from tests.support.agent import OVMD, Agent
from tests.support.processes import ROOT, child_env
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

SETS = 40  # values 1..SETS, after 0
KEY = "race.counter"


@pytest.fixture
def stack(short_dir):
    channel = os.path.join(short_dir, "vm1.pty")
    with BridgeProc({"vm1": "pty:" + channel}, os.path.join(short_dir, "db")) as bridge:
        bridge.wait_ready()
        agent = Agent(channel)
        try:
            agent.start().wait_ready()
            wait_for(lambda: agent_state(bridge, "vm1") == "connected", what="the agent to sync")
            yield bridge, agent
        finally:
            agent.close()


def guest_loop(agent, done_path, first, last):
    """`ovmd -p KEY=i` for i in first..last, one process each, in the guest's shell; each i is
    appended to ``done_path`` once its `ovmd -p` has returned. It stops early once a file
    ``done_path``.stop exists (stop_loop)."""
    script = (
        'i=%d; while [ "$i" -le %d ] && [ ! -e "$DONE.stop" ]; do '
        '"$OVMD" --socket "$SOCK" --config /nonexistent -p "%s=$i" || exit 1; '
        'echo "$i" >> "$DONE"; i=$((i + 1)); done'
    ) % (first, last, KEY)
    env = child_env({"OVMD": OVMD, "SOCK": agent.socket, "DONE": done_path}, pythonpath=[ROOT])
    return subprocess.Popen(["sh", "-c", script], env=env, cwd=ROOT)


def stop_loop(loop, done_path):
    with open(done_path + ".stop", "w"):
        pass
    assert loop.wait(60) == 0


def returned(done_path):
    """The highest value whose `ovmd -p` has returned (0 before any)."""
    try:
        with open(done_path) as f:
            lines = f.read().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


def query(client, key, fresh=False):
    if fresh:
        return client.request("GET", path("vms", "vm1", "keys", key, query={"fresh": "true"}))
    return client.query("vm1", key)


class Querier(threading.Thread):
    """One sequential host querier: each answer is checked as it comes."""

    def __init__(self, client, done_path, stop, fresh_every=0):
        super().__init__(daemon=True)
        self.client, self.done_path, self.stop = client, done_path, stop
        self.fresh_every = fresh_every  # every Nth query with fresh=true (0: never)
        self.answers = []  # (value, fresh, the highest set returned before it was sent)
        self.problems = []

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            fresh = bool(self.fresh_every) and n % self.fresh_every == 0
            before = returned(self.done_path)
            try:
                doc = query(self.client, KEY, fresh)
            except ApiError as e:
                self.problems.append("query failed: %s %s" % (e.code, e.message))
                return
            if doc["stale"] is not False:
                self.problems.append("a stale answer while the agent is synced: %r" % doc)
            self.answers.append((doc["value"], fresh, before))


def test_answers_during_guest_sets_should_be_set_values_never_going_backwards(stack, short_dir):
    bridge, agent = stack
    assert agent.ovmd("-p", "%s=0" % KEY).returncode == 0
    client = Client(bridge.api_socket, timeout=30)
    wait_for(lambda: query(client, KEY)["value"] == "0", what="the first value at the host")
    done_path = os.path.join(short_dir, "done")
    stop = threading.Event()
    queriers = [Querier(Client(bridge.api_socket, timeout=30), done_path, stop, fresh_every=3)]
    queriers.append(Querier(Client(bridge.api_socket, timeout=30), done_path, stop))
    for q in queriers:
        q.start()
    writer = guest_loop(agent, done_path, 1, SETS)
    try:
        assert writer.wait(120) == 0
    finally:
        stop.set()
        for q in queriers:
            q.join(30)
    assert returned(done_path) == SETS

    set_values = {str(i) for i in range(SETS + 1)}
    for q in queriers:
        assert not q.problems, q.problems[:3]
        assert q.answers, "a querier got no answer"
        values = [int(v) for v, _, _ in q.answers if v in set_values]
        assert len(values) == len(q.answers), "an answer that was never set: %r" % [
            v for v, _, _ in q.answers if v not in set_values
        ]
        assert values == sorted(values), "answers went backwards: %r" % values
        # A round trip sees every set that had returned before the query was sent.
        late = [(v, before) for v, fresh, before in q.answers if fresh and int(v) < before]
        assert not late, "fresh answers older than a set that had returned: %r" % late[:3]
    assert any(fresh for q in queriers for _, fresh, _ in q.answers)

    # The last set has returned: a round trip sees it at once, the mirror once the bridge has
    # read its announcement; after that, no answer is older.
    assert query(client, KEY, fresh=True)["value"] == str(SETS)
    wait_for(
        lambda: query(client, KEY)["value"] == str(SETS), what="the mirror to see the last set"
    )
    assert query(client, KEY)["value"] == str(SETS)

    # Not synced: the mirror's answer, stale, as before.
    agent.kill()
    wait_for(lambda: agent_state(bridge, "vm1") != "connected", what="the agent to be gone")
    doc = query(client, KEY)
    assert (doc["value"], doc["stale"]) == (str(SETS), True)
    assert isinstance(doc["last_seen"], float)
    assert query(client, KEY, fresh=True)["stale"] is True


def test_a_host_send_should_be_seen_by_the_next_query(stack, short_dir):
    bridge, agent = stack
    client = Client(bridge.api_socket, timeout=30)
    # The guest changes another key meanwhile, so that the host's frames share the channel.
    done_path = os.path.join(short_dir, "done")
    writer = guest_loop(agent, done_path, 1, 10**6)
    try:
        for i in range(40):
            assert client.send("vm1", "host.counter", str(i))["outcome"] == "delivered"
            doc = query(client, "host.counter")
            assert (doc["value"], doc["origin"], doc["stale"]) == (str(i), "host", False)
    finally:
        stop_loop(writer, done_path)


def test_a_value_sent_with_log_off_should_come_from_the_agent_after_a_restart(stack):
    bridge, _ = stack
    secret = "not-On-Disk-%d" % os.getpid()
    assert cli(bridge, "send", "--no-log", "vm1", "app.password", secret).returncode == 0
    client = Client(bridge.api_socket, timeout=30)
    assert query(client, "app.password")["value"] == secret
    bridge.stop()
    with open(bridge.db, "rb") as f:
        assert secret.encode() not in f.read()
    ready_before = bridge.log().count(" ready")
    bridge.start()
    wait_for(lambda: bridge.log().count(" ready") > ready_before, what="the bridge to restart")
    wait_for(lambda: agent_state(bridge, "vm1") == "connected", what="the agent to sync again")
    # The mirror loaded from disk has the key without its value: the agent answers.
    doc = query(client, "app.password")
    assert (doc["value"], doc["stale"]) == (secret, False)


def test_vmmessage_query_fresh_should_ask_the_agent(stack):
    bridge, agent = stack
    assert agent.ovmd("-p", "app.role=web").returncode == 0
    r = cli(bridge, "query", "--fresh", "vm1", "app.role")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "Query for Key : 'app.role' returned value 'web'."
    r = cli(bridge, "query", "--fresh", "vm1", "no.such.key")
    assert r.returncode == 1 and "no.such.key" in r.stderr
