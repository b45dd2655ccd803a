"""The bridge finds a real libvirt guest by itself and follows it across a destroy and a start.

A real libvirtd (tests/e2e/libvirt_daemon.py) runs a transient domain whose name is longer than the
20 characters libvirt keeps in the channel directory, with the agent's channel declared WITHOUT a
path (libvirt binds it at /var/lib/libvirt/qemu/channel/target/domain-<id>-<first 20 chars>/
com.oracle.ovmd) and the test guest's control channel on a socket of ours (guest_image.py). The real
`hostbridge` runs with discovery only (no --vm, default channel directories); the test speaks to it
as a manager would, with `vmmessage`, and looks inside the guest through the control channel.

The tests run in file order and share one bridge and one domain name; the domain is destroyed
and started again half-way. Figures are printed: run with -s to see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from tests.e2e.guest_image import AGENT_PORT, CONTROL_PORT
from tests.e2e.libvirt_daemon import (
    CHANNEL_TARGET_DIR,
    LibvirtError,
    channel_dir,
    domain_xml,
    running_libvirt,
)
from tests.e2e.qemu import GuestControl
from tests.support import waiting
from tests.support.processes import ROOT, child_env

BIN = os.path.dirname(sys.executable)
HOSTBRIDGE = os.path.join(BIN, "hostbridge")
VMMESSAGE = os.path.join(BIN, "vmmessage")
# More than 20 characters, and unique per run: the directory shows only "ovmd-e2e-discovery-g".
VM = "ovmd-e2e-discovery-guest-%s" % os.urandom(3).hex()
BOOT_TIMEOUT = 120.0  # boot to agent connected: ~7 s idle; a loaded 2-core machine is far slower
TIMEOUT = 30.0  # the bridge noticing a stop (its scan runs every 2 s)

pytestmark = pytest.mark.timeout(400)


def wait_for(cond, timeout=TIMEOUT, what="condition", interval=0.2):
    return waiting.wait_for(cond, timeout, interval=interval, what=what)


class DiscoveringBridge:
    """`hostbridge` with discovery only: no --vm, no --libvirt-dir (libvirt's default dirs)."""

    def __init__(self, workdir):
        self.db = os.path.join(workdir, "bridge.sqlite3")
        self.api = os.path.join(workdir, "api.sock")
        self.log_path = os.path.join(workdir, "bridge.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [HOSTBRIDGE, "--discover", "--db", self.db, "--api-socket", self.api, "-d", "2"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(drop_prefixes=["VMMESSAGE_"]),
            )
        wait_for(lambda: self._alive() and " ready" in self.log(), what="the bridge to be ready")

    def _alive(self):
        if self.proc.poll() is not None:
            raise AssertionError("bridge exited %s:\n%s" % (self.proc.returncode, self.log()))
        return True

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def vmmessage(self, *args):
        return subprocess.run(
            [VMMESSAGE, "--bridge", self.api, *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=child_env(drop_prefixes=["VMMESSAGE_"]),
        )

    def vms(self):
        """GET /v1/vms through `vmmessage --json list`: {name: vm}."""
        self._alive()
        r = self.vmmessage("--json", "list")
        assert r.returncode == 0, r.stderr
        return {vm["name"]: vm for vm in json.loads(r.stdout)["vms"]}

    def vm(self, name=VM):
        return self.vms().get(name)


class Env:
    def __init__(self, lv, image, workdir, bridge):
        self.lv, self.image, self.workdir, self.bridge = lv, image, workdir, bridge
        self.control_socket = os.path.join(workdir, "control.sock")
        self.serial_log = os.path.join(workdir, "serial.log")
        self.ctl = None
        self.dom_id = None

    def start_domain(self, name=VM):
        """Create the domain (again); its id. The agent starts at boot (guest_image.py)."""
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        xml = domain_xml(
            name,
            self.image.kernel,
            self.image.initrd,
            self.image.cmdline,
            channels=[(AGENT_PORT, None), (CONTROL_PORT, self.control_socket)],
            serial_log=self.serial_log,
        )
        started = time.monotonic()
        self.dom_id = self.lv.create(xml)
        print("virsh create: %.1f s, domain id %d" % (time.monotonic() - started, self.dom_id))
        self.started = started
        return self.dom_id

    def control(self):
        if self.ctl is None:
            self.ctl = GuestControl(self.control_socket, self.serial_log)
            self.ctl.wait_ready(BOOT_TIMEOUT)
        return self.ctl

    def wait_connected(self, dom_id):
        """The bridge lists VM, discovered at this boot's channel, with its agent connected."""
        path = os.path.join(channel_dir(dom_id, VM), AGENT_PORT)

        def connected():
            vm = self.bridge.vm()
            return (
                vm
                if vm and vm["channel"] == "unix:" + path and vm["agent"] == "connected"
                else None
            )

        try:
            vm = wait_for(
                connected, BOOT_TIMEOUT, "the bridge to connect to domain %d's agent" % dom_id
            )
        except AssertionError as e:
            raise AssertionError("%s; the bridge lists %r" % (e, self.bridge.vms())) from None
        print(
            "agent connected through the bridge %.1f s after virsh create"
            % (time.monotonic() - self.started)
        )
        return vm


@pytest.fixture(scope="module")
def env(image):
    workdir = tempfile.mkdtemp(prefix="e2e-lv-", dir="/tmp")
    bridge = None
    try:
        with running_libvirt(workdir) as lv:
            print(
                "\nlibvirtd %s, answering after %.1f s%s"
                % (
                    "started by the test" if lv.libvirtd else "already running (not ours)",
                    lv.start_seconds,
                    ", QEMU as root (private qemu.conf)" if lv.private_qemu_conf else "",
                )
            )
            has_binding = (
                subprocess.run(
                    [sys.executable, "-c", "import libvirt"], capture_output=True
                ).returncode
                == 0
            )
            print(
                "the bridge (%s) resolves names with %s"
                % (sys.executable, "libvirt-python" if has_binding else "`virsh domname`")
            )
            bridge = DiscoveringBridge(workdir)
            e = Env(lv, image, workdir, bridge)
            try:
                yield e
            finally:
                if e.ctl is not None:
                    e.ctl.close()
                bridge.stop()  # first: it would only retry the channels being torn down
    except LibvirtError as err:
        pytest.fail("libvirt: %s" % err)
    finally:
        if bridge is not None:
            bridge.stop()
        if os.environ.get("OVMD_E2E_KEEP") is None:
            subprocess.run(["rm", "-rf", workdir])


def test_the_bridge_should_find_the_libvirt_guest_under_its_full_name_with_its_agent(env):
    assert len(VM) > 20
    assert VM not in env.bridge.vms()
    dom_id = env.start_domain()
    vm = env.wait_connected(dom_id)
    assert vm["source"] == "discovered"
    assert vm["channel"].startswith(
        "unix:/var/lib/libvirt/qemu/channel/target/domain-%d-%s/" % (dom_id, VM[:20])
    )
    # Under its full name only: the directory's truncated name is not listed as another VM.
    assert VM[:20] not in env.bridge.vms()
    # The same "connected" as libvirt sees it (the guest has the port open) and as the guest says.
    assert env.lv.channel_state(VM, AGENT_PORT) == "connected"
    assert env.control().call("ping")["agent_pid"] is not None
    r = env.bridge.vmmessage("list")
    assert r.returncode == 0 and VM in r.stdout and "connected" in r.stdout, r.stdout + r.stderr


# hostbridge.discovery resolves the full name with libvirt-python when it can import it, else
# with `virsh domname ID`. Both are run here against the live domain, each forced alone: the
# venv's interpreter (the bridge above runs there) with `libvirt` unimportable, and Debian's
# python3 (as the packaged bridge runs) with python3-libvirt and no virsh on PATH.
_RESOLVE = """
import asyncio, json, sys
if sys.argv[2] == "virsh":
    sys.modules["libvirt"] = None  # import libvirt -> ImportError
from hostbridge.discovery import NameResolver, scan
found = [f for f in scan([sys.argv[3]]) if f.dom_id == int(sys.argv[1])]
r = NameResolver()
print(json.dumps({"short": [f.short_name for f in found], "libvirt": r._libvirt is not None,
                  "name": asyncio.run(r.resolve(found[0])) if found else None}))
"""


@pytest.mark.parametrize("path", ["virsh", "libvirt-python"])
def test_discovery_should_resolve_the_full_name_through_each_libvirt_path(env, path):
    assert env.lv.domid(VM) == env.dom_id
    python, environ = sys.executable, child_env(pythonpath=[ROOT], drop_prefixes=["VMMESSAGE_"])
    if path == "libvirt-python":
        python = "/usr/bin/python3"  # python3-libvirt (scripts/packages-test.txt)
        environ["PATH"] = "/nonexistent"  # no virsh: the name can only come from libvirt-python
    r = subprocess.run(
        [python, "-c", _RESOLVE, str(env.dom_id), path, CHANNEL_TARGET_DIR],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=environ,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["short"] == [VM[:20]]
    assert out["libvirt"] is (path == "libvirt-python")
    assert out["name"] == VM


def test_the_bridge_should_mark_a_destroyed_guest_disconnected_and_queue_for_it(env):
    assert env.bridge.vm()["agent"] == "connected"
    old_dir = channel_dir(env.dom_id, VM)
    env.lv.destroy(VM)
    assert not os.path.exists(old_dir)  # libvirt removes the directory on destroy
    vm = wait_for(
        lambda: (env.bridge.vm() or {}).get("agent") == "disconnected" and env.bridge.vm(),
        what="the bridge to notice the destroy",
    )
    assert vm["name"] == VM  # it stays listed, with its outbox
    r = env.bridge.vmmessage("send", VM, "com.example.e2e.while-down", "queued-value-1")
    assert r.returncode == 0, r.stderr
    assert "queued" in r.stdout
    r = env.bridge.vmmessage("--json", "send", VM, "com.example.e2e.while-down-2", "v2")
    assert r.returncode == 0 and json.loads(r.stdout)["outcome"] == "queued", r.stdout + r.stderr
    assert env.bridge.vm()["queued"] == 2


def test_the_bridge_should_follow_the_guest_to_its_new_domain_id_and_deliver_the_queue(env):
    old_id = env.dom_id
    assert env.bridge.vm()["queued"] == 2
    new_id = env.start_domain()
    assert new_id != old_id
    env.wait_connected(new_id)
    wait_for(lambda: env.bridge.vm()["queued"] == 0, BOOT_TIMEOUT, "the outbox to drain")
    ctl = env.control()
    r = ctl.run(["ovmd", "-g", "com.example.e2e.while-down"])
    assert (r.rc, r.stdout) == (0, b"queued-value-1\n"), r.stderr
    r = ctl.run(["ovmd", "-l"])
    # The agent's own facts (org.ovmd.guest.*, docs/cli.md) are beside the messages.
    lines = [x for x in r.stdout.decode().splitlines() if not x.startswith('{"org.ovmd.guest.')]
    assert lines == [
        '{"com.example.e2e.while-down":"queued-value-1"}',
        '{"com.example.e2e.while-down-2":"v2"}',
    ]
    # And back: a key the guest sets reaches the manager through the rediscovered channel.
    assert ctl.run(["ovmd", "-p", "com.example.e2e.from-guest=hello-host"]).rc == 0

    def query():
        r = env.bridge.vmmessage("query", VM, "com.example.e2e.from-guest")
        return r if r.returncode == 0 else None

    r = wait_for(query, what="the guest's key at the bridge")
    assert "returned value 'hello-host'" in r.stdout
    # One VM under its one full name across both boots (never the directory's truncated name).
    assert VM[:20] not in env.bridge.vms()


def test_the_bridge_should_not_take_another_vm_for_ours_when_libvirtd_restarts_its_ids(env):
    """After a libvirtd restart, domain ids start again at 1: another VM whose name shares our
    first 20 characters gets the very directory name our VM had at its first boot
    (domain-1-ovmd-e2e-discovery-g). The bridge must ask libvirt again, not reuse the name it
    resolved for that directory name before, or it would hand our VM's messages to the other."""
    if env.lv.libvirtd is None:
        pytest.skip("libvirtd is the machine's: the test does not restart it")
    env.lv.destroy(VM)
    wait_for(lambda: env.bridge.vm()["agent"] == "disconnected", what="the destroy noticed")
    env.lv.restart_libvirtd()
    r = env.bridge.vmmessage("--json", "send", VM, "com.example.e2e.secret", "for-our-vm-only")
    assert r.returncode == 0 and json.loads(r.stdout)["outcome"] == "queued", r.stdout + r.stderr
    other = VM[:20] + "uest-other-" + VM[-6:]
    assert other[:20] == VM[:20] and other != VM
    other_id = env.start_domain(other)
    assert other_id == 1  # the id (and so the directory name) our VM had at its first boot
    path = "unix:" + os.path.join(channel_dir(other_id, other), AGENT_PORT)
    try:
        wait_for(
            lambda: (env.bridge.vms().get(other) or {}).get("channel") == path,
            BOOT_TIMEOUT,
            "the bridge to find %s under its own name" % other,
        )
    except AssertionError as e:
        raise AssertionError("%s; the bridge lists %r" % (e, env.bridge.vms())) from None
    env.control()  # the other guest is up, its agent running
    wait_for(
        lambda: env.bridge.vms()[other]["agent"] == "connected",
        BOOT_TIMEOUT,
        "the other VM's agent to connect",
    )
    ours = env.bridge.vm()
    assert ours["agent"] == "disconnected" and ours["queued"] == 1, ours
    r = env.ctl.run(["ovmd", "-g", "com.example.e2e.secret"])
    assert r.rc == 1 and r.stdout == b"", r
    env.lv.destroy(other)
