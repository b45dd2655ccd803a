"""The change stream through a real bridge process and real agents on ptys: Server-Sent Events and
the long poll see guest keys set and deleted, agents leaving and coming back and messages queued
and delivered; a reader that stops reading costs the bridge no memory beyond its bounds; `vmmessage
wait` and `vmmessage watch` on top of it."""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import time
from contextlib import closing

import pytest

from hostbridge.apiclient import Client
from tests.hostbridge.bridge_harness import BridgeProc, cli, cli_popen
from tests.support.agent import Agent
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


class SseReader:
    """A raw Server-Sent Events client on the bridge's unix socket (HTTP/1.0: no chunking, the
    body ends with the connection)."""

    def __init__(self, api_socket: str, query: str = "", headers: str = "", read: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not read:
            # A reader that never reads: the smallest receive buffer, so the bridge's writes block.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(api_socket)
        self.sock.sendall(
            b"GET /v1/events/stream%s HTTP/1.0\r\nHost: x\r\n%s\r\n"
            % (query.encode(), headers.encode())
        )
        self.buf = b""
        self.head = b""
        if read:
            self._fill(lambda: b"\r\n\r\n" in self.buf)
            self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)

    def _fill(self, done, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise AssertionError(
                    "no event in %g s; got so far: %r" % (timeout, self.buf[-500:])
                )
            data = self.sock.recv(1 << 16)
            if not data:
                raise AssertionError("the stream ended: %r" % self.buf[-500:])
            self.buf += data

    def next_event(self, timeout: float = 20.0) -> dict:
        """The next event block's JSON (comments skipped), with its SSE id and event name."""
        deadline = time.monotonic() + timeout
        while True:
            self._fill(lambda: b"\n\n" in self.buf, max(deadline - time.monotonic(), 0.01))
            block, self.buf = self.buf.split(b"\n\n", 1)
            fields = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "data" in fields:
                doc = json.loads(fields["data"])
                doc["_sse"] = (fields.get("id"), fields.get("event"))
                return doc

    def until(self, match, timeout: float = 20.0) -> dict:
        """The first event ``match`` accepts (the others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next_event(max(deadline - time.monotonic(), 0.01))
            if match(ev):
                return ev

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def two_vms(short_dir):
    """A bridge on two pty channels with an agent on each (started and ready)."""
    ch1, ch2 = os.path.join(short_dir, "c1"), os.path.join(short_dir, "c2")
    bridge = BridgeProc({"vm1": "pty:" + ch1, "vm2": "pty:" + ch2}, os.path.join(short_dir, "db"))
    with closing(bridge):
        bridge.start().wait_ready()
        with closing(Agent(ch1)) as a1, closing(Agent(ch2)) as a2:
            a1.start().wait_ready()
            a2.start().wait_ready()
            api = Client(bridge.api_socket)
            wait_for(
                lambda: all(api.vm(v)["agent"] == "connected" for v in ("vm1", "vm2")),
                what="both agents connected",
            )
            yield bridge, api, a1, a2


def test_a_stream_should_see_guest_keys_agents_and_messages_as_they_happen(two_vms):
    bridge, api, a1, a2 = two_vms
    with closing(SseReader(bridge.api_socket)) as sse:
        assert b"200 OK" in sse.head and b"text/event-stream" in sse.head
        assert a1.ovmd("-p", "com.example.role=web").returncode == 0
        ev = sse.until(lambda e: e["type"] == "key.set")
        assert (ev["vm"], ev["key"], ev["value"], ev["origin"]) == (
            "vm1",
            "com.example.role",
            "web",
            "guest",
        )
        assert ev["_sse"] == (str(ev["id"]), "key.set")
        assert api.send("vm2", "com.example.msg", "hello")["outcome"] == "delivered"
        # Queued, then delivered; the guest's announcement of the key (origin host) may come
        # before or after the delivery is recorded.
        got = {}
        while len(got) < 3:
            ev = sse.next_event()
            got.setdefault(ev["type"], ev)
        queued, delivered, host_set = (
            got["message.queued"],
            got["message.delivered"],
            got["key.set"],
        )
        assert queued["id"] < delivered["id"]
        assert queued["vm"] == delivered["vm"] == "vm2" and queued["seq"] == delivered["seq"]
        assert delivered["key"] == "com.example.msg" and delivered["waited"] >= 0
        assert (host_set["vm"], host_set["key"], host_set["origin"]) == (
            "vm2",
            "com.example.msg",
            "host",
        )
        assert a1.ovmd("-r", "com.example.role").returncode == 0
        ev = sse.until(lambda e: e["type"] == "key.deleted")
        assert (ev["vm"], ev["key"]) == ("vm1", "com.example.role")
        a2.stop()
        ev = sse.until(lambda e: e["type"] == "agent.state")
        assert (ev["vm"], ev["agent"]) == ("vm2", "disconnected")
        a2.start().wait_ready()
        ev = sse.until(lambda e: e["type"] == "agent.state" and e["agent"] == "connected")
        assert ev["vm"] == "vm2" and ev["agent_version"]


def test_a_log_off_value_should_never_be_in_the_stream(two_vms):
    bridge, api, a1, _a2 = two_vms
    with closing(SseReader(bridge.api_socket, "?vm=vm1")) as sse:
        api.send("vm1", "com.oracle.linux.root-password", "s3cret-pw", log=False)
        ev = sse.until(lambda e: e["type"] == "key.set")
        assert ev["hidden"] is True and "value" not in ev
        assert b"s3cret-pw" not in sse.buf
        a1.ovmd("-p", "com.oracle.linux.root-password=guest-own")  # the guest's own: shown
        ev = sse.until(lambda e: e["type"] == "key.set")
        assert ev["hidden"] is False and ev["value"] == "guest-own"


def test_a_stream_should_resume_after_last_event_id_and_filter_by_vm(two_vms):
    bridge, _api, a1, a2 = two_vms
    with closing(SseReader(bridge.api_socket, "?vm=vm2")) as sse:
        a1.ovmd("-p", "one=1")
        a2.ovmd("-p", "two=2")
        ev = sse.until(lambda e: e["type"] == "key.set")
        assert (ev["vm"], ev["key"]) == ("vm2", "two")  # vm1's came first and was filtered out
    cursor = ev["id"]
    a2.ovmd("-p", "three=3")
    a2.ovmd("-p", "four=4")
    with closing(SseReader(bridge.api_socket, "?vm=vm2", "Last-Event-ID: %d\r\n" % cursor)) as sse:
        keys = [sse.until(lambda e: e["type"] == "key.set")["key"] for _ in range(2)]
        assert keys == ["three", "four"]


def test_the_long_poll_should_answer_at_the_first_event_or_empty_at_its_timeout(two_vms):
    bridge, api, a1, _a2 = two_vms
    cursor = api.events(timeout=0)["last"]
    t0 = time.monotonic()
    empty = api.events(since=cursor, vm="vm1", timeout=0.3)
    assert empty["events"] == [] and time.monotonic() - t0 >= 0.25
    a1.ovmd("-p", "polled=yes")
    doc = api.events(since=cursor, vm="vm1", timeout=10)
    assert [(e["type"], e["key"]) for e in doc["events"]] == [("key.set", "polled")]
    assert doc["last"] > cursor
    bad = cli(bridge, "watch", "no-such-vm")
    assert bad.returncode == 1 and "no-such-vm" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_reader_that_stops_reading_should_not_grow_the_bridge_and_should_be_told_what_it_missed(
    two_vms,
):
    bridge, api, _a1, _a2 = two_vms
    stuck = SseReader(bridge.api_socket, read=False)
    with closing(stuck):
        big = "x" * 8000
        rss_before = _rss(bridge.proc.pid)
        # More than the ring holds in bytes (4 MiB; each delivered send is a key.set carrying
        # its 8 KiB value): the stuck reader falls off it.
        for i in range(600):
            assert api.send("vm1", "k%d" % (i % 50), big)["outcome"] == "delivered"
        wait_for(lambda: api.health()["events_dropped"] > 0, what="the ring to drop old events")
        grown = _rss(bridge.proc.pid) - rss_before
        health = api.health()
        assert health["event_bytes"] <= 4 << 20
        # The bridge holds what its ring holds (~4 MiB) plus what one socket buffer takes.
        assert grown < 24 << 20, "the bridge grew by %d bytes" % grown
        # The stuck reader starts reading: first the head and what was in flight, then an overflow.
        stuck.sock.setblocking(True)
        stuck._fill(lambda: b"\r\n\r\n" in stuck.buf)
        stuck.head, stuck.buf = stuck.buf.split(b"\r\n\r\n", 1)
        ev = stuck.until(lambda e: e["type"] == "overflow", timeout=60)
        assert ev["missed"] > 0
        # ...and it goes on from the oldest event still kept.
        assert stuck.next_event()["type"] in ("key.set", "message.queued", "message.delivered")


def _rss(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_vmmessage_wait_should_return_soon_after_the_guest_sets_the_key(two_vms):
    bridge, api, a1, _a2 = two_vms
    delays = []
    for i in range(5):
        key = "com.example.ready%d" % i
        waiter = cli_popen(bridge, "wait", "vm1", key, "--timeout", "30")
        # The waiter is following the stream once the bridge counts it as a consumer.
        wait_for(lambda: api.health()["event_consumers"] >= 1, what="the wait to poll")
        t0 = time.monotonic()
        assert a1.ovmd("-p", "%s=go%d" % (key, i)).returncode == 0
        out, err = waiter.communicate(timeout=30)
        delays.append(time.monotonic() - t0)
        assert waiter.returncode == 0, err
        assert out.splitlines()[0] == "Query for Key : '%s' returned value 'go%d'." % (key, i)
    # From `ovmd -p` starting (a process start, ~40 ms of it) to the waiter's exit.
    print(
        "\nvmmessage wait: returned %s ms after ovmd -p started" % [round(d * 1000) for d in delays]
    )
    assert statistics.median(delays) < 1.0


def test_vmmessage_wait_should_answer_at_once_for_a_set_key_and_time_out_with_exit_1(two_vms):
    bridge, api, a1, _a2 = two_vms
    a1.ovmd("-p", "here=already")
    r = cli(bridge, "wait", "vm1", "here", "--timeout", "5")
    assert r.returncode == 0 and "returned value 'already'" in r.stdout
    t0 = time.monotonic()
    r = cli(bridge, "wait", "vm1", "never", "--timeout", "0.5")
    assert r.returncode == 1
    assert r.stderr == "vmmessage: error: key 'never' of VM 'vm1' was not set within 0.5 s\n"
    assert time.monotonic() - t0 < 20
    # --changed waits for a new set even though the key exists, and sees a deletion.
    waiter = cli_popen(bridge, "wait", "vm1", "here", "--changed", "--json", "--timeout", "30")
    wait_for(lambda: api.health()["event_consumers"] >= 1, what="the wait to poll")
    a1.ovmd("-p", "here=again")
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and json.loads(out)["value"] == "again"
    waiter = cli_popen(bridge, "wait", "vm1", "here", "--changed", "--timeout", "30")
    wait_for(lambda: api.health()["event_consumers"] >= 1, what="the wait to poll")
    a1.ovmd("-r", "here")
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and out == "Key 'here' was deleted.\n"
    r = cli(bridge, "wait", "no-such-vm", "k", "--timeout", "1")
    assert r.returncode == 1 and "no-such-vm" in r.stderr


def test_vmmessage_watch_should_print_each_event_as_a_line_or_json(two_vms):
    bridge, api, a1, a2 = two_vms
    lines_watch = cli_popen(bridge, "watch")
    json_watch = cli_popen(bridge, "watch", "vm1", "--json")
    try:
        wait_for(lambda: api.health()["event_consumers"] >= 2, what="both watchers to poll")
        a1.ovmd("-p", "com.example.evil=\x1b[31mred")
        a2.ovmd("-p", "other=vm2")
        line = _read_line(lines_watch, lambda s: "com.example.evil" in s)
        assert " vm1 key.set com.example.evil = '\\x1b[31mred' (guest)" in line
        doc = json.loads(_read_line(json_watch, lambda s: "key.set" in s))
        assert (doc["vm"], doc["key"], doc["value"]) == ("vm1", "com.example.evil", "\x1b[31mred")
        a2.ovmd("-p", "last=one")
        _read_line(lines_watch, lambda s: " vm2 key.set last" in s)
    finally:
        for p in (lines_watch, json_watch):
            p.terminate()
            p.communicate(timeout=30)
    # vm2's events never reached the vm1 watcher: its lines were all vm1's.


def _read_line(proc, match, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
            line = proc.stdout.readline()
            if not line:
                break
            if match(line):
                return line
    raise AssertionError("no matching line from %s" % proc.args)
