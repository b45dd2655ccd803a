"""End to end through a real QEMU guest: the real bridge on QEMU's socket, `vmmessage` as the
manager, `ovmd` inside the guest (run there through the control port, see guest_image.py).

One guest is booted for the whole module (boots are slow under software emulation); it starts
without its agent so that the first scenario can queue messages before the agent runs. The tests
run in file order and each leaves the guest with its agent running and the bridge connected.
Figures (image build, boot, round trip) are printed: run with -s to see them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import pytest

from tests.e2e import guest_image
from tests.e2e.qemu import GuestControl, QemuGuest, boot, ping_round_trips
from tests.e2e.qemu_bridge import VM, Bridge, wait_for

pytestmark = pytest.mark.timeout(300)


class Env:
    def __init__(self, guest: QemuGuest, ctl: GuestControl, bridge: Bridge):
        self.guest, self.ctl, self.bridge = guest, ctl, bridge

    def ovmd(self, *args):
        return self.ctl.run(["ovmd", *args])

    def ensure_agent(self):
        if self.ctl.call("ping")["agent_pid"] is None:
            self.ctl.call("agent_start")

    def ensure_bridge(self):
        if not self.bridge.running():
            self.bridge.start()
        self.ensure_agent()
        self.bridge.wait_synced()


@pytest.fixture(scope="module")
def env(image):
    print(
        "\nimage %s: %.1f MB (kernel + initrd), built in %.1f s%s"
        % (
            image.key,
            image.size / 1e6,
            image.build_seconds,
            "" if image.build_seconds else " (cached)",
        )
    )
    workdir = tempfile.mkdtemp(prefix="e2e-", dir="/tmp")
    guest = boot(image, workdir, agent=False)
    bridge = None
    try:
        # The bridge connects while the guest is still booting, before any agent runs.
        bridge = Bridge(workdir, guest.agent_socket).start()
        ctl = guest.control()
        print("guest control ready %.1f s after QEMU started" % (time.monotonic() - guest.started))
        yield Env(guest, ctl, bridge)
    finally:
        if bridge is not None:
            bridge.kill()
        guest.kill()
        if os.environ.get("OVMD_E2E_KEEP") is None:
            subprocess.run(["rm", "-rf", workdir])


def test_it_should_deliver_messages_queued_before_the_agent_starts_once_and_in_order(env):
    assert env.ctl.call("ping")["agent_pid"] is None
    # Events are kept as a list, not a key: a message applied twice would show twice.
    for i in range(1, 6):
        r = env.bridge.vmmessage("send", VM, "VMAPIEvent", "early-event-%d" % i)
        assert r.returncode == 0, r.stderr
        assert b"queued" in r.stdout
    for v in ("first", "second", "third"):
        assert env.bridge.vmmessage("send", VM, "early.key", v).returncode == 0
    for i in range(1, 4):
        assert env.bridge.vmmessage("send", VM, "early.order.%d" % i, str(i)).returncode == 0
    assert env.bridge.status()["queued"] == 11

    env.ctl.call("agent_start")
    started = env.guest.started
    env.bridge.wait_synced()
    wait_for(lambda: env.bridge.status()["queued"] == 0, what="the outbox to drain")
    print(
        "agent synced with the bridge %.1f s after QEMU started (first boot, with the "
        "test's queueing)" % (time.monotonic() - started)
    )

    events = env.ovmd("--events")
    assert events.rc == 0, events.stderr
    assert [json.loads(line)["VMAPIEvent"] for line in events.stdout.splitlines()] == [
        "early-event-%d" % i for i in range(1, 6)
    ]
    assert env.ovmd("-g", "early.key").stdout == b"third\n"
    listing = [json.loads(line) for line in env.ovmd("-l").stdout.splitlines()]
    early = [key for key in (next(iter(d)) for d in listing) if key.startswith("early.")]
    assert early == ["early.key", "early.order.1", "early.order.2", "early.order.3"]


def test_the_guest_should_run_the_agent_installed_from_the_wheel_without_orjson(env):
    r = env.ctl.run(
        [
            "python3",
            "-c",
            "import guestagent, sys; print(guestagent.__file__); "
            "print(sys.version.split()[0]); import orjson",
        ]
    )
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "/usr/lib/python3/dist-packages/guestagent/__init__.py"
    assert lines[1].startswith("3.11.")
    assert r.rc == 1 and b"No module named 'orjson'" in r.stderr
    assert "JSON by json" in env.guest.serial_text()


def test_the_image_should_come_from_the_cache_until_an_input_changes(tmp_path, monkeypatch):
    first, again = guest_image.build_image(), guest_image.build_image()
    assert (again.key, again.build_seconds) == (first.key, 0.0)
    guest_files = tmp_path / "guest"
    guest_files.mkdir()
    for p in guest_image.GUEST_FILES.iterdir():
        if p.is_file():
            (guest_files / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(guest_image, "GUEST_FILES", guest_files)
    kpkg = guest_image.kernel_package()
    assert guest_image.input_key(kpkg) == first.key
    with open(guest_files / "init", "a") as f:
        f.write("# changed\n")
    assert guest_image.input_key(kpkg) != first.key


def test_it_should_show_a_host_message_to_ovmd_in_the_guest(env):
    env.ensure_bridge()
    r = env.bridge.vmmessage("send", VM, "com.example.host.greeting", "hello from the host")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"Message sent successfully."
    g = env.ovmd("-g", "com.example.host.greeting")
    assert (g.rc, g.stdout) == (0, b"hello from the host\n")
    j = json.loads(env.ovmd("-g", "com.example.host.greeting", "--json").stdout)
    assert j["origin"] == "host"


def test_it_should_answer_a_host_query_with_a_value_set_in_the_guest_and_its_time(env):
    env.ensure_bridge()
    before = time.time()
    p = env.ovmd("-p", "com.example.guest.role=web")
    after = time.time()
    assert p.rc == 0, p.stderr
    r = env.bridge.vmmessage("--json", "query", VM, "com.example.guest.role")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert (answer["value"], answer["origin"], answer["stale"]) == ("web", "guest", False)
    # The guest's clock comes from QEMU's RTC (the host's time, to the second).
    assert before - 30 < answer["ts"] < after + 30
    human = env.bridge.vmmessage("query", VM, "com.example.guest.role")
    assert human.stdout.splitlines()[0] == (
        b"Query for Key : 'com.example.guest.role' returned value 'web'."
    )
    assert human.stdout.splitlines()[1].startswith(b"Key set ")


def _max_key():
    key = "com.example.max." + "\u00e9" * 60  # 16 + 120 bytes
    key += "k" * (256 - len(key.encode()))
    assert len(key.encode()) == 256
    return key


def _max_value(seed):
    # Every kind of byte a value may hold that argv can carry: quotes, backslashes, newlines,
    # tabs, 2-, 3- and 4-byte UTF-8, JSON's escapes.
    chunk = '%s "q" \\b\\ \n\t\u00e9\u20ac\U0001f600 <>{}[]:,' % seed
    value = ""
    while len((value + chunk).encode()) <= 8192:
        value += chunk
    value += "x" * (8192 - len(value.encode()))
    assert len(value.encode()) == 8192
    return value


def test_it_should_carry_the_largest_key_and_value_byte_for_byte_both_ways(env):
    env.ensure_bridge()
    key, value = _max_key(), _max_value("host")
    r = env.bridge.vmmessage("send", VM, key, value)
    assert r.returncode == 0, r.stderr
    g = env.ovmd("-g", key)
    assert g.rc == 0, g.stderr
    assert g.stdout == value.encode() + b"\n"

    gkey, gvalue = key[:-1] + "g", _max_value("guest")
    p = env.ovmd("-p", "%s=%s" % (gkey, gvalue))
    assert p.rc == 0, p.stderr
    q = env.bridge.vmmessage("--json", "query", VM, gkey)
    assert q.returncode == 0, q.stderr
    answer = json.loads(q.stdout)
    assert answer["key"] == gkey
    assert answer["value"].encode() == gvalue.encode()


def test_it_should_refuse_oversized_keys_and_values_on_both_sides(env):
    env.ensure_bridge()
    big_value, big_key = "v" * 8193, "k" * 257
    r = env.bridge.vmmessage("send", VM, "com.example.big", big_value)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert b"8193 bytes, the limit is 8192 bytes" in r.stderr
    r = env.bridge.vmmessage("send", VM, big_key, "v")
    assert r.returncode == 2
    assert b"257 bytes, the limit is 256 bytes" in r.stderr
    status, body = env.bridge.http(
        "POST", "/v1/vms/%s/messages" % VM, {"key": "com.example.big", "value": big_value}
    )
    assert (status, body["error"]["code"]) == (413, "value_too_long")
    status, body = env.bridge.http(
        "POST", "/v1/vms/%s/messages" % VM, {"key": big_key, "value": "v"}
    )
    assert (status, body["error"]["code"]) == (413, "key_too_long")

    p = env.ovmd("-p", "com.example.big=" + big_value)
    assert p.rc == 2
    assert p.stderr == b"ovmd: value is 8193 bytes, the limit is 8192 bytes\n"
    p = env.ovmd("-p", big_key + "=v")
    assert p.rc == 2
    assert b"257 bytes, the limit is 256 bytes" in p.stderr
    assert env.ovmd("-g", "com.example.big").rc == 1
    assert env.bridge.vmmessage("query", VM, "com.example.big").returncode == 1


def test_it_should_resync_and_lose_nothing_when_the_bridge_is_killed_and_restarted(env):
    env.ensure_bridge()
    assert env.bridge.vmmessage("send", VM, "com.example.before-kill", "1").returncode == 0
    env.bridge.kill(signal.SIGKILL)
    # While no bridge runs: the guest changes its cache (the host must catch up), and a stray
    # client leaves half a frame in QEMU's buffer (the guest must drop it at the next RESYNC).
    assert env.ovmd("-p", "com.example.while-down=guest").rc == 0
    assert env.ovmd("-r", "com.example.guest.role").rc == 0
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stray.connect(env.guest.agent_socket)
    stray.sendall(b'{"t":"set","id":77,"key":"com.example.stale","value":"st')
    stray.close()

    env.bridge.start()
    env.bridge.wait_synced()
    for i in range(1, 4):
        assert env.bridge.vmmessage("send", VM, "com.example.after-restart", str(i)).returncode == 0
    assert env.ovmd("-g", "com.example.after-restart").stdout == b"3\n"
    assert env.ovmd("-g", "com.example.before-kill").stdout == b"1\n"
    assert env.ovmd("-g", "com.example.stale").rc == 1
    q = env.bridge.vmmessage("--json", "query", VM, "com.example.while-down")
    assert json.loads(q.stdout)["value"] == "guest"
    # The mirror caught up with the delete too (query answers from the guest; keys from the mirror).
    keys = json.loads(env.bridge.vmmessage("--json", "keys", VM).stdout)
    names = [e["key"] for e in keys["entries"]]
    assert "com.example.guest.role" not in names and "com.example.while-down" in names
    assert env.bridge.status()["queued"] == 0


def test_it_should_deliver_to_a_guest_agent_that_was_killed_and_restarted(env):
    env.ensure_bridge()
    old = env.ctl.call("ping")["agent_pid"]
    assert env.ctl.call("agent_kill", {"signal": 9})["status"] == -9
    # The bridge cannot see the agent go (QEMU tells the host nothing): the send times out and
    # stays queued, its bytes held by QEMU until the next agent opens the port.
    r = env.bridge.vmmessage("send", VM, "VMAPIEvent", "while-agent-dead", "--timeout", "2")
    assert r.returncode == 0, r.stderr
    assert b"queued" in r.stdout
    r = env.bridge.vmmessage("send", VM, "com.example.while-agent-dead", "x", "--timeout", "2")
    assert r.returncode == 0, r.stderr

    new = env.ctl.call("agent_start")["pid"]
    assert new != old
    env.bridge.wait_synced()
    wait_for(lambda: env.bridge.status()["queued"] == 0, what="the outbox to drain")
    assert env.ovmd("-g", "com.example.while-agent-dead").stdout == b"x\n"
    # The cache in /run/ovmd survived the agent; the event arrived once.
    assert env.ovmd("-g", "com.example.host.greeting").stdout == b"hello from the host\n"
    events = [json.loads(line)["VMAPIEvent"] for line in env.ovmd("--events").stdout.splitlines()]
    assert events.count("while-agent-dead") == 1
    assert events[-1] == "while-agent-dead"


def test_it_should_use_almost_no_cpu_in_the_guest_while_no_host_is_connected(env):
    env.ensure_bridge()
    env.bridge.kill(signal.SIGTERM)
    time.sleep(0.5)  # let the guest see the hangup before the measured window starts
    a = env.ctl.call("agent_stat")
    t0 = time.monotonic()
    time.sleep(3.0)
    b = env.ctl.call("agent_stat")
    elapsed = time.monotonic() - t0
    ticks = (b["utime"] + b["stime"]) - (a["utime"] + a["stime"])
    switches = sum(b["ctxt"]) - sum(a["ctxt"])
    print(
        "agent idle without a host: %d ticks (1/%d s) and %d context switches in %.1f s"
        % (ticks, a["clk_tck"], switches, elapsed)
    )
    assert a["pid"] == b["pid"]
    # A loop spinning on the port's HUP would use the whole 3 s (hundreds of ticks, tens of
    # thousands of switches); an idle agent uses none. Allow a few ticks for timers and noise.
    assert ticks <= 0.05 * elapsed * a["clk_tck"]
    assert switches < 100


def test_zz_round_trip_through_the_real_port(env):
    """A measurement, not an assertion on time: p50 of 200 pings through QEMU's socket."""
    env.ensure_agent()
    env.bridge.kill(signal.SIGTERM)
    times = ping_round_trips(env.guest.agent_socket, 200)
    times.sort()
    print(
        "round trip through the real port: p50 %.3f ms, p90 %.3f ms over %d pings"
        % (statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3, len(times))
    )
    assert len(times) == 200
