"""The bridge daemon as a real process: kill -9 with queued messages, agent restarts, a unix
channel behind a QEMU stand-in (one connection, reconnect with backoff), and queued messages
cancelled or expired for a guest that is absent."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest

from hostbridge.apiclient import Client
from tests.hostbridge.bridge_harness import BridgeProc, QemuStandIn
from tests.support.agent import Agent
from tests.support.processes import child_env, script
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(90)


def agent_state(client, vm):
    return client.vm(vm)["agent"]


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


@pytest.fixture
def vm1(short_dir):
    """An agent (not started) on VM vm1's pty channel, and a function that starts a bridge on
    that channel, each on the same database; all of them are closed at the end."""
    channel = os.path.join(short_dir, "ch")
    bridges = []

    def start_bridge():
        bridges.append(BridgeProc({"vm1": "pty:" + channel}, os.path.join(short_dir, "db")))
        return bridges[-1].start().wait_ready()

    with closing(Agent(channel)) as agent:
        try:
            yield agent, start_bridge
        finally:
            for bridge in bridges:
                bridge.close()


def test_queued_messages_should_survive_kill_9_of_the_bridge_and_arrive_in_order(vm1):
    agent, start_bridge = vm1
    bridge = start_bridge()
    api = Client(bridge.api_socket)
    outcomes = [api.send("vm1", "k%d" % (i % 2), "v%d" % i)["outcome"] for i in range(4)]
    assert outcomes == ["queued"] * 4
    bridge.kill()  # SIGKILL: no shutdown code runs
    api = Client(start_bridge().api_socket)
    assert api.vm("vm1")["queued"] == 4
    agent.start().wait_ready()
    wait_for(lambda: api.vm("vm1")["queued"] == 0, what="the outbox to drain")
    assert (guest_value(agent, "k0"), guest_value(agent, "k1")) == ("v2", "v3")
    audit = api.audit("vm1")
    rows = audit["entries"] if isinstance(audit, dict) else audit
    assert [r["outcome"] for r in rows] == ["delivered"] * 4
    # The agent restarts (kill -9 too): nothing is delivered twice, sends work again.
    agent.kill()
    wait_for(lambda: agent_state(api, "vm1") == "disconnected", what="agent gone")
    assert api.send("vm1", "k0", "after")["outcome"] == "queued"
    agent.start().wait_ready()
    wait_for(lambda: api.vm("vm1")["queued"] == 0, what="the outbox to drain again")
    assert guest_value(agent, "k0") == "after" and guest_value(agent, "k1") == "v3"
    assert api.send("vm1", "k9", "live")["outcome"] == "delivered"


def test_a_delivered_message_should_survive_kill_9_of_both_bridge_and_agent(vm1):
    agent, start_bridge = vm1
    bridge = start_bridge()
    agent.start().wait_ready()
    api = Client(bridge.api_socket)
    wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync")
    assert api.send("vm1", "durable", "yes")["outcome"] == "delivered"
    bridge.kill()
    agent.kill()
    api = Client(start_bridge().api_socket)
    agent.start().wait_ready()
    wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync")
    assert guest_value(agent, "durable") == "yes"
    assert api.vm("vm1")["queued"] == 0
    assert api.query("vm1", "durable")["value"] == "yes"


def vmmessage(bridge, *args, **popen):
    """`vmmessage ARGS` against ``bridge``, as a process (Popen when ``popen`` says so)."""
    env = child_env({"VMMESSAGE_BRIDGE": bridge.api_socket}, drop_prefixes=("VMMESSAGE_",))
    argv = [script("vmmessage"), *args]
    if popen:
        return subprocess.Popen(argv, text=True, env=env, **popen)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def outbox_keys(db):
    """The keys in the outbox of the database ``db`` (the bridge's file, read beside it)."""
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            return [key for (key,) in conn.execute("SELECT key FROM outbox ORDER BY seq")]
    except sqlite3.OperationalError:  # not created yet
        return []


def test_a_send_cut_off_by_kill_9_after_its_commit_should_be_applied_once_when_retried(vm1):
    agent, start_bridge = vm1
    bridge = start_bridge()
    agent.start().wait_ready()
    wait_for(lambda: agent_state(Client(bridge.api_socket), "vm1") == "connected", what="sync")
    send = ["send", "vm1", "VMAPIEvent", "boot-1", "--id", "web1-boot-1", "--timeout", "60"]
    # The agent stops reading: the bridge commits the event, writes it and waits for the ack;
    # the test knows the commit happened from the database itself, then kills the bridge.
    agent.signal(signal.SIGSTOP)
    try:
        first = vmmessage(bridge, *send, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: outbox_keys(bridge.db) == ["VMAPIEvent"], what="the commit")
            bridge.kill()
            _, err = first.communicate(timeout=60)
        finally:
            first.kill()
    finally:
        agent.signal(signal.SIGCONT)
    # vmmessage tried again by itself (the bridge stayed down), then said what to do.
    assert first.returncode == 3, err
    assert "5 attempts; the message may have been queued" in err and "--id web1-boot-1" in err
    bridge = start_bridge()
    api = Client(bridge.api_socket)
    wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync after the restart")
    again = vmmessage(bridge, *send, "--json")
    assert again.returncode == 0, again.stderr
    # One event in the guest, one message in the bridge's audit, and the retry told so.
    events = agent.ovmd("--events", "--json").stdout.splitlines()
    assert [json.loads(line)["value"] for line in events] == ["boot-1"]
    assert [(r["key"], r["outcome"]) for r in api.audit("vm1")["entries"]] == [
        ("VMAPIEvent", "delivered")
    ]
    answer = json.loads(again.stdout)
    assert (answer["outcome"], answer["seq"], answer["replayed"]) == ("delivered", 1, True)


def write_config(directory, sock, limits=""):
    path = os.path.join(directory, "bridge.toml")
    with open(path, "w") as f:
        f.write(
            "[limits]\ndelivery_timeout = 2.0\nkeepalive = 2.0\nreconnect_max = 0.5\n%s\n"
            '[[vm]]\nname = "vm1"\nchannel = "unix:%s"\n' % (limits, sock)
        )
    return path


@pytest.fixture
def behind_qemu(short_dir):
    """A QEMU stand-in on a unix socket, an agent (not started) on its pty, and the bridge on the
    socket; yields (qemu, agent, a client of the bridge's API)."""
    sock = os.path.join(short_dir, "qemu.sock")
    link = os.path.join(short_dir, "port")
    with QemuStandIn(sock, link) as qemu, closing(Agent(link)) as agent:
        qemu.wait_ready()
        with BridgeProc({}, args=["--config", write_config(short_dir, sock)]) as bridge:
            bridge.wait_ready()
            yield qemu, agent, Client(bridge.api_socket)


def test_a_unix_channel_should_hold_one_connection_and_reconnect_when_qemu_returns(behind_qemu):
    qemu, agent, api = behind_qemu
    assert api.vm("vm1")["channel"] == "unix:" + qemu.socket
    agent.start().wait_ready()
    wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync over unix")
    assert api.send("vm1", "k", "one")["outcome"] == "delivered"
    assert qemu.clients() == 1
    # QEMU goes away and comes back (a new process on the same path): the bridge reconnects.
    qemu.kill()
    wait_for(lambda: agent_state(api, "vm1") == "disconnected", what="link lost")
    assert api.send("vm1", "k", "two")["outcome"] == "queued"
    os.unlink(qemu.socket + ".clients")
    with QemuStandIn(qemu.socket, qemu.link) as qemu2:
        qemu2.wait_ready()
        agent.kill()  # the old agent held the old pty; a new one opens the new link
        agent.start().wait_ready()
        wait_for(lambda: api.vm("vm1")["queued"] == 0, what="queued message delivered")
        assert guest_value(agent, "k") == "two"
        assert qemu2.clients() == 1
        assert api.vm("vm1")["counters"]["reconnects"] >= 1


def test_an_agent_stopping_behind_qemu_should_be_noticed_and_its_messages_queued(behind_qemu):
    qemu, agent, api = behind_qemu
    agent.start().wait_ready()
    wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync")
    agent.stop()
    # QEMU keeps the socket up: only the keepalive's unanswered ping tells.
    wait_for(lambda: agent_state(api, "vm1") == "connecting", what="keepalive timeout")
    assert api.send("vm1", "k", "later", timeout=1.0)["outcome"] == "queued"
    agent.start().wait_ready()
    wait_for(lambda: api.vm("vm1")["queued"] == 0, what="delivery after restart")
    assert guest_value(agent, "k") == "later"
    assert qemu.clients() == 1


def test_the_daemon_should_refuse_a_bad_flag_with_one_line():
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "hostbridge.daemon", "--vm", "nochannel"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "NAME=unix:PATH" in r.stderr


def test_the_daemon_should_tell_systemd_it_is_ready_then_feed_its_watchdog(short_dir):
    import select
    import socket
    import time

    path = os.path.join(short_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    bridge = BridgeProc({}, db=os.path.join(short_dir, "bridge.sqlite3"))
    bridge.env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    got = []

    def receive(until):
        deadline = time.monotonic() + 20
        while not until() and time.monotonic() < deadline:
            if select.select([sock], [], [], 0.5)[0]:
                got.append(sock.recv(4096).decode())

    try:
        bridge.start()
        receive(lambda: "READY=1" in got and got[got.index("READY=1") :].count("WATCHDOG=1") >= 3)
        bridge.stop()
        receive(lambda: "STOPPING=1" in got)
    finally:
        sock.close()
    assert "READY=1" in got, (got, bridge.log())
    assert got[got.index("READY=1") :].count("WATCHDOG=1") >= 3, got
    assert got[-1] == "STOPPING=1", got


def test_the_audit_should_keep_the_number_of_rows_the_config_file_names(short_dir):
    path = os.path.join(short_dir, "bridge.toml")
    with open(path, "w") as f:
        f.write("[bridge]\nlog = true\n\n[limits]\naudit_rows = 2\n")
    # No agent: every send is queued, and each one is an audit row.
    bridge = BridgeProc({"vm1": "pty:" + os.path.join(short_dir, "ch")}, args=["--config", path])
    bridge.start().wait_ready()
    try:
        api = Client(bridge.api_socket)
        for i in range(5):
            assert api.send("vm1", "k%d" % i, "v")["outcome"] == "queued"
        audit = api.audit("vm1")
        rows = audit["entries"] if isinstance(audit, dict) else audit
        assert [r["key"] for r in rows] == ["k4", "k3"]
        assert api.vm("vm1")["queued"] == 5
        assert bridge.log().count("[bridge] log is obsolete") == 1
    finally:
        bridge.close()


def db_bytes(db):
    """The database as it is on disk: the file, its WAL and shared-memory index."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(db + suffix):
            with open(db + suffix, "rb") as f:
                data += f.read()
    return data


def secret_value(size):
    token = os.urandom(8).hex()  # 16 characters found in any 32-byte piece of the value
    return token.encode(), (token * (size // 16 + 1))[:size]


@pytest.fixture
def guest_absent(short_dir):
    """vm1's unix channel, whose socket does not exist yet (the VM is not running), and
    ``start(limits)``: the bridge on it, with those [limits] lines; then ``arrive()``: the VM
    comes (a QEMU stand-in on the socket, an agent behind it); yields (start, arrive)."""
    sock = os.path.join(short_dir, "qemu.sock")
    link = os.path.join(short_dir, "port")
    parts = []

    def start(limits=""):
        bridge = BridgeProc({}, args=["--config", write_config(short_dir, sock, limits)])
        parts.append(bridge)
        return bridge.start().wait_ready()

    def arrive():
        qemu = QemuStandIn(sock, link)
        parts.append(qemu)
        qemu.start().wait_ready()
        agent = Agent(link)
        parts.append(agent)
        return agent.start().wait_ready()

    try:
        yield start, arrive
    finally:
        for part in reversed(parts):
            part.close()


def audit_of(api, key):
    return [(r["outcome"], r["value"]) for r in api.audit("vm1")["entries"] if r["key"] == key]


@pytest.mark.parametrize("size", [40, 8192])
def test_a_cancelled_log_off_message_should_leave_no_trace_and_never_be_delivered(
    guest_absent, size
):
    start, arrive = guest_absent
    bridge = start()
    api = Client(bridge.api_socket)
    token, secret = secret_value(size)
    assert api.send("vm1", "root-pw", secret, log=False)["outcome"] == "queued"
    assert api.send("vm1", "kept", "public-value")["outcome"] == "queued"
    assert token in db_bytes(bridge.db)  # on disk while it waits
    r = vmmessage(bridge, "queue", "vm1")
    assert r.returncode == 0 and token.decode() not in r.stdout
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["SEQ", "1", "2"]
    assert "%d bytes" % size in r.stdout.splitlines()[1]
    r = vmmessage(bridge, "cancel", "vm1", "1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "Message 1 to VM 'vm1' cancelled.\n", "")
    assert token not in db_bytes(bridge.db)
    assert api.vm("vm1")["queued"] == 1
    assert audit_of(api, "root-pw") == [("cancelled", None)]
    r = vmmessage(bridge, "cancel", "vm1", "1")  # nothing left to cancel
    assert r.returncode == 1 and "no message 1 waiting for delivery" in r.stderr
    # The VM comes: the message left is delivered, the cancelled one never.
    agent = arrive()
    wait_for(lambda: api.vm("vm1")["queued"] == 0, what="the outbox to drain")
    assert guest_value(agent, "kept") == "public-value"
    assert guest_value(agent, "root-pw") is None
    assert audit_of(api, "root-pw") == [("cancelled", None)]
    assert token not in db_bytes(bridge.db) and token.decode() not in bridge.log()


def test_a_queued_message_should_expire_after_the_configured_time_and_never_be_delivered(
    guest_absent,
):
    start, arrive = guest_absent
    bridge = start("message_expiry = 1")
    api = Client(bridge.api_socket)
    token, secret = secret_value(100)
    assert api.send("vm1", "root-pw", secret, log=False)["outcome"] == "queued"
    r = vmmessage(bridge, "send", "vm1", "forever", "v", "--expires", "never")
    assert r.returncode == 0 and "Message queued" in r.stdout
    wait_for(lambda: audit_of(api, "root-pw") == [("expired", None)], what="the expiry")
    assert token not in db_bytes(bridge.db)
    assert api.vm("vm1")["queued"] == 1 and audit_of(api, "forever") == [("queued", "v")]
    agent = arrive()
    wait_for(lambda: api.vm("vm1")["queued"] == 0, what="the outbox to drain")
    assert guest_value(agent, "forever") == "v" and guest_value(agent, "root-pw") is None
    assert audit_of(api, "root-pw") == [("expired", None)]
