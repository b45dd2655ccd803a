"""A guest running ovmd is live-migrated between two real libvirtds on this machine: the agent goes
on as the same process with its cache, and each libvirtd's lifecycle events say what happened.

Two private libvirtds (tests/e2e/libvirt_pair.py: each in its own mount namespace, distinct
host_uuid) run as hosts A and B. The e2e guest (guest_image.py: the real agent on the real
virtio-serial port) boots on A with both its channels' paths chosen by libvirt; a real `hostbridge`
on A's agent channel syncs with it and sets a key, the guest sets another. Then `virsh migrate
--live` moves it to B over loopback TCP. After the move the control program, reached through B's
channel, reports the same agent pid, and a real bridge on B's agent channel reads both keys live
from the agent. hostbridge.lifecycle.Lifecycle, one per libvirtd, records libvirt's raw events:
SUSPENDED_MIGRATED then STOPPED_MIGRATED on A, STARTED_MIGRATED then RESUMED_MIGRATED on B.

The tests run in file order and share the hosts, the guest and the followers. Figures (migration
time, downtime, event times relative to the start of `virsh migrate`) are printed: run with -s.
Bounds are functional only: MIGRATE_TIMEOUT, EVENT_TIMEOUT, BOOT_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
import threading
import time

import pytest

from hostbridge.lifecycle import Lifecycle, LifecycleEvent
from tests.e2e import qemu_bridge
from tests.e2e.guest_image import AGENT_PORT, CONTROL_PORT
from tests.e2e.libvirt_daemon import LibvirtError, _alive, domain_xml
from tests.e2e.libvirt_pair import LibvirtHost, migrate, preflight, running_pair
from tests.e2e.qemu import GuestControl
from tests.e2e.qemu_bridge import Bridge
from tests.support import waiting

VM = "ovmd-e2e-migration-%s" % os.urandom(3).hex()
BRIDGE_VM = qemu_bridge.VM  # the name each bridge gives the guest (--vm NAME=unix:PATH)
BOOT_TIMEOUT = 120.0  # boot to control program ready: ~7 s idle, far slower on a loaded machine
EVENT_TIMEOUT = 30.0  # virsh migrate returned: the followers have the last event well before
TIMEOUT = 60.0
GUEST_KEY = ("com.example.migration.guest-set", "set-in-the-guest-on-A")
HOST_KEY = ("com.example.migration.host-set", "sent-by-the-bridge-on-A")

pytestmark = pytest.mark.timeout(600)


class Followers:
    """A Lifecycle on each libvirtd, run in an asyncio loop on a thread of ours (the tests are
    synchronous); every event of VM is kept, per host, in the order it was delivered."""

    def __init__(self, hosts):
        self.events: dict[str, list[LifecycleEvent]] = {h.name: [] for h in hosts}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="followers", daemon=True)
        self.thread.start()
        self.followers = {}
        try:
            for h in hosts:
                self.followers[h.name] = Lifecycle(h.uri, self._keep(h.name))
                self._run(self.followers[h.name].start())
                assert self.followers[h.name].connected, "Lifecycle did not connect to %s" % h.uri
        except BaseException:
            self.stop()
            raise

    def _keep(self, host):
        def on_event(ev: LifecycleEvent) -> None:
            if ev.name == VM:
                self.events[host].append(ev)

        return on_event

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def details(self, host: str, since: float = 0.0) -> list[str | None]:
        """The raw details of host's lifecycle events (not the listings) since ``since``."""
        return [
            e.detail for e in list(self.events[host]) if e.event != "LISTED" and e.time >= since
        ]

    def state(self, host):
        return self._run(self._state(host))

    async def _state(self, host):
        return self.followers[host].state(VM)

    def stop(self):
        try:
            for lc in self.followers.values():
                self._run(lc.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            if not self.thread.is_alive():
                self.loop.close()


class Env:
    def __init__(self, a, b, image, workdir, followers):
        self.a, self.b, self.image, self.workdir = a, b, image, workdir
        self.followers = followers
        self.serial_log = os.path.join(workdir, "serial.log")
        self.bridges: dict[str, Bridge] = {}
        self.controls: list[GuestControl] = []
        self.agent_pid = None
        self.moved_at = None  # time.time() when `virsh migrate` began
        self.source_exit = None  # time.time() when the source QEMU had exited

    def watch_exit(self, pid):
        deadline = time.monotonic() + TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        if not _alive(pid):
            self.source_exit = time.time()

    def control(self, host: LibvirtHost) -> GuestControl:
        """The guest's control program through ``host``'s control channel, answering."""
        ctl = GuestControl(host.channel_socket(VM, CONTROL_PORT), self.serial_log)
        self.controls.append(ctl)
        ctl.wait_ready(BOOT_TIMEOUT)
        return ctl

    def bridge(self, host: LibvirtHost) -> Bridge:
        """A real hostbridge on ``host``'s agent channel (its own database), synced."""
        workdir = os.path.join(self.workdir, "bridge-%s" % host.name)
        os.makedirs(workdir, exist_ok=True)
        bridge = Bridge(workdir, host.channel_socket(VM, AGENT_PORT))
        self.bridges[host.name] = bridge
        bridge.start()
        bridge.wait_synced(BOOT_TIMEOUT)
        return bridge

    def close(self):
        for ctl in self.controls:
            ctl.close()
        for bridge in self.bridges.values():
            bridge.kill()


@pytest.fixture(scope="module")
def env(image):
    why = preflight()
    if why is not None:
        pytest.skip("libvirt or QEMU is missing: %s" % why)
    workdir = tempfile.mkdtemp(prefix="e2e-mig-", dir="/tmp")
    try:
        with running_pair(workdir) as (a, b):
            print(
                "\nhost A %s up in %.1f s, host B %s up in %.1f s"
                % (a.host_uuid, a.start_seconds, b.host_uuid, b.start_seconds)
            )
            followers = Followers([a, b])
            e = Env(a, b, image, workdir, followers)
            try:
                yield e
            finally:
                e.close()
                followers.stop()
    except LibvirtError as err:
        pytest.fail("libvirt: %s" % err)
    finally:
        if os.environ.get("OVMD_E2E_KEEP") is None:
            subprocess.run(["rm", "-rf", workdir])


def test_the_guest_should_run_on_host_a_with_a_key_from_each_side_in_its_agents_cache(env):
    # Both channels without a path: libvirt binds them under its own (here: host A's) directory,
    # and a destination chooses its own paths again.
    xml = domain_xml(
        VM,
        env.image.kernel,
        env.image.initrd,
        env.image.cmdline,
        channels=[(AGENT_PORT, None), (CONTROL_PORT, None)],
        serial_log=env.serial_log,
    )
    started = time.monotonic()
    env.a.create(xml)
    ctl = env.control(env.a)
    print("guest control ready on A %.1f s after virsh create" % (time.monotonic() - started))
    env.agent_pid = ctl.call("ping")["agent_pid"]
    assert env.agent_pid is not None, "the agent does not run in the guest"
    r = ctl.run(["ovmd", "-p", "%s=%s" % GUEST_KEY])
    assert r.rc == 0, r.stderr

    bridge = env.bridge(env.a)
    r = bridge.vmmessage("send", BRIDGE_VM, *HOST_KEY)
    assert r.returncode == 0, r.stderr
    waiting.wait_for(
        lambda: ctl.run(["ovmd", "-g", HOST_KEY[0]]).stdout == HOST_KEY[1].encode() + b"\n",
        TIMEOUT,
        interval=0.2,
        what="the host's key in the agent's cache",
    )
    q = bridge.vmmessage("--json", "query", BRIDGE_VM, GUEST_KEY[0])
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["value"] == GUEST_KEY[1]
    assert env.followers.state("A").state == "running"


def test_virsh_migrate_live_should_move_the_guest_to_host_b(env):
    source_qemu = env.a.qemu_pid(VM)
    watcher = threading.Thread(target=env.watch_exit, args=(source_qemu,), daemon=True)
    env.moved_at = time.time()
    watcher.start()
    took = migrate(env.a, env.b, VM)
    watcher.join(TIMEOUT)
    assert env.a.domains() == [], "the guest still runs on A"
    assert VM in env.b.domains()
    job = env.b.jobinfo(VM)  # the incoming migration's figures, as QEMU measured them
    print(
        "virsh migrate --live: %.2f s; incoming job on B: %s elapsed, downtime %s, %s transferred"
        % (
            took,
            job.get("Time elapsed"),
            job.get("Total downtime"),
            job.get("Data processed"),
        )
    )


def test_each_libvirtd_should_report_the_raw_migration_events_in_order(env):
    f = env.followers
    expect = {
        "A": ["SUSPENDED_MIGRATED", "STOPPED_MIGRATED"],
        "B": ["STARTED_MIGRATED", "RESUMED_MIGRATED"],
    }
    waiting.wait_for(
        lambda: all(len(f.details(h, env.moved_at)) >= len(expect[h]) for h in expect),
        EVENT_TIMEOUT,
        interval=0.05,
        what="both followers' migration events (so far: %s)"
        % {h: f.details(h, env.moved_at) for h in expect},
    )
    timeline = sorted(
        (
            (e.time, host, e)
            for host in expect
            for e in f.events[host]
            if e.event != "LISTED" and e.time >= env.moved_at
        ),
        key=lambda row: row[0],
    )
    rows = [(t, host, "%-18s run state %s" % (e.detail, e.state)) for t, host, e in timeline]
    if env.source_exit is not None:
        rows.append((env.source_exit, "A", "(the source QEMU has exited)"))
    for t, host, what in sorted(rows, key=lambda row: row[0]):
        print("  +%.3f s  host %s  %s" % (t - env.moved_at, host, what))
    assert f.details("A", env.moved_at) == expect["A"]
    assert f.details("B", env.moved_at) == expect["B"]
    assert [e.state for _, h, e in timeline if h == "A"] == ["migrating", "shutoff"]
    assert [e.state for _, h, e in timeline if h == "B"] == ["migrating", "running"]
    assert (f.state("A").state, f.state("A").reason) == ("shutoff", "STOPPED_MIGRATED")
    assert (f.state("B").state, f.state("B").reason) == ("running", "RESUMED_MIGRATED")


def test_the_agent_should_be_the_same_process_with_its_cache_after_the_move(env):
    ctl = env.control(env.b)
    assert ctl.call("ping")["agent_pid"] == env.agent_pid
    for key, value in (GUEST_KEY, HOST_KEY):
        r = ctl.run(["ovmd", "-g", key])
        assert (r.rc, r.stdout) == (0, value.encode() + b"\n"), r.stderr


def test_a_bridge_on_host_b_should_read_both_keys_live_from_the_agent(env):
    bridge = env.bridge(env.b)
    for key, value, origin in ((*GUEST_KEY, "guest"), (*HOST_KEY, "host")):
        q = bridge.vmmessage("--json", "query", BRIDGE_VM, key)
        assert q.returncode == 0, q.stderr
        answer = json.loads(q.stdout)
        assert (answer["value"], answer["origin"], answer["stale"]) == (value, origin, False)


def test_the_bridge_on_host_a_should_only_see_its_channel_close(env):
    # Nothing on the channel says "migrating": A's bridge loses its link when the source QEMU
    # exits, as it would at any stop. A pool has to learn the move from libvirt's events.
    bridge = env.bridges["A"]
    status = waiting.wait_for(
        lambda: (s := bridge.status())["agent"] != "connected" and s,
        TIMEOUT,
        interval=0.1,
        what="A's bridge to notice its channel is gone",
    )
    lost = re.search(r"^(\S+ \S+),(\d+) \S+ INFO: link lost: ", bridge.log(), re.M)
    assert lost, bridge.log()[-2000:]
    at = time.mktime(time.strptime(lost.group(1), "%Y-%m-%d %H:%M:%S")) + int(lost.group(2)) / 1e3
    print(
        "A's bridge: link lost at +%.3f s (its log's clock, to the ms); agent now %s"
        % (at - env.moved_at, status["agent"])
    )
