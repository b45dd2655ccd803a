"""The bridge daemon as a real process: kill -9 with queued messages, agent restarts, and a unix
channel behind a QEMU stand-in (one connection, reconnect with backoff)."""

import os
import shutil

import pytest
from bridge_harness import Agent, BridgeProc, QemuStandIn, short_tempdir, wait_for

from hostbridge.apiclient import Client

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tmp():
    d = short_tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def agent_state(client, vm):
    return client.vm(vm)["agent"]


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


def test_queued_messages_should_survive_kill_9_of_the_bridge_and_arrive_in_order(tmp):
    channel = os.path.join(tmp, "ch")
    db = os.path.join(tmp, "bridge.sqlite3")
    agent = Agent(channel)
    bridge = BridgeProc({"vm1": "pty:" + channel}, db=db).start().wait_ready()
    try:
        api = Client(bridge.api_socket)
        outcomes = [api.send("vm1", "k%d" % (i % 2), "v%d" % i)["outcome"] for i in range(4)]
        assert outcomes == ["queued"] * 4
        bridge.kill()  # SIGKILL: no shutdown code runs
        bridge2 = BridgeProc({"vm1": "pty:" + channel}, db=db).start().wait_ready()
        try:
            api = Client(bridge2.api_socket)
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
        finally:
            bridge2.close()
    finally:
        bridge.close()
        agent.close()


def test_a_delivered_message_should_survive_kill_9_of_both_bridge_and_agent(tmp):
    channel = os.path.join(tmp, "ch")
    db = os.path.join(tmp, "bridge.sqlite3")
    agent = Agent(channel)
    bridge = BridgeProc({"vm1": "pty:" + channel}, db=db).start().wait_ready()
    try:
        agent.start().wait_ready()
        api = Client(bridge.api_socket)
        wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync")
        assert api.send("vm1", "durable", "yes")["outcome"] == "delivered"
        bridge.kill()
        agent.kill()
        bridge = BridgeProc({"vm1": "pty:" + channel}, db=db).start().wait_ready()
        agent.start().wait_ready()
        api = Client(bridge.api_socket)
        wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync")
        assert guest_value(agent, "durable") == "yes"
        assert api.vm("vm1")["queued"] == 0
        assert api.query("vm1", "durable")["value"] == "yes"
    finally:
        bridge.close()
        agent.close()


def write_config(tmp, sock):
    path = os.path.join(tmp, "bridge.toml")
    with open(path, "w") as f:
        f.write(
            "[limits]\ndelivery_timeout = 2.0\nkeepalive = 2.0\nreconnect_max = 0.5\n\n"
            '[[vm]]\nname = "vm1"\nchannel = "unix:%s"\n' % sock
        )
    return path


def test_a_unix_channel_should_hold_one_connection_and_reconnect_when_qemu_returns(tmp):
    sock = os.path.join(tmp, "qemu.sock")
    link = os.path.join(tmp, "port")
    qemu = QemuStandIn(sock, link).start().wait_ready()
    agent = Agent(link)
    bridge = BridgeProc({}, args=["--config", write_config(tmp, sock)]).start().wait_ready()
    try:
        api = Client(bridge.api_socket)
        assert api.vm("vm1")["channel"] == "unix:" + sock
        agent.start().wait_ready()
        wait_for(lambda: agent_state(api, "vm1") == "connected", what="sync over unix")
        assert api.send("vm1", "k", "one")["outcome"] == "delivered"
        assert qemu.clients() == 1
        # QEMU goes away and comes back (a new process on the same path): the bridge reconnects.
        qemu.kill()
        wait_for(lambda: agent_state(api, "vm1") == "disconnected", what="link lost")
        assert api.send("vm1", "k", "two")["outcome"] == "queued"
        qemu2 = QemuStandIn(sock, link)
        qemu2.dir, qemu2.log_path = qemu.dir, os.path.join(qemu.dir, "log2")
        os.unlink(sock + ".clients")
        qemu2.start().wait_ready()
        agent.kill()  # the old agent held the old pty; a new one opens the new link
        agent.start().wait_ready()
        wait_for(lambda: api.vm("vm1")["queued"] == 0, what="queued message delivered")
        assert guest_value(agent, "k") == "two"
        assert qemu2.clients() == 1
        assert api.vm("vm1")["counters"]["reconnects"] >= 1
        qemu2.kill()
    finally:
        bridge.close()
        agent.close()
        qemu.close()


def test_an_agent_stopping_behind_qemu_should_be_noticed_and_its_messages_queued(tmp):
    sock = os.path.join(tmp, "qemu.sock")
    link = os.path.join(tmp, "port")
    qemu = QemuStandIn(sock, link).start().wait_ready()
    agent = Agent(link)
    bridge = BridgeProc({}, args=["--config", write_config(tmp, sock)]).start().wait_ready()
    try:
        api = Client(bridge.api_socket)
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
    finally:
        bridge.close()
        agent.close()
        qemu.close()


def test_the_daemon_should_refuse_a_bad_flag_with_one_line(tmp):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "hostbridge.daemon", "--vm", "nochannel"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "NAME=unix:PATH" in r.stderr


def test_the_daemon_should_tell_systemd_it_is_ready_then_feed_its_watchdog(tmp):
    import select
    import socket
    import time

    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    bridge = BridgeProc({}, db=os.path.join(tmp, "bridge.sqlite3"))
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


def test_the_audit_should_keep_the_number_of_rows_the_config_file_names(tmp):
    path = os.path.join(tmp, "bridge.toml")
    with open(path, "w") as f:
        f.write("[bridge]\nlog = true\n\n[limits]\naudit_rows = 2\n")
    # No agent: every send is queued, and each one is an audit row.
    bridge = BridgeProc({"vm1": "pty:" + os.path.join(tmp, "ch")}, args=["--config", path])
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
