"""The ovmd .deb in a Debian guest that boots systemd (systemd_image.py, systemd_guest.py): udev
starts the agent when its port appears, systemd's watchdog restarts an agent that hangs, and the
agent serves its local clients.

One guest is booted for the whole module (a full boot under emulation takes about half a minute, far
more on a loaded machine). Everything is read from inside the guest through the control program.
Boot timings (QEMU start to the control program's first answer, systemd-analyze) are printed: run
with -s to see them; they are also in the first test's assertion messages.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass, field

import pytest

from tests.e2e.qemu import QEMU, GuestControl
from tests.e2e.systemd_guest import SystemdGuest, boot_systemd
from tests.e2e.systemd_image import ImageError, SystemdImage, build_systemd_image
from tests.hostbridge.bridge_harness import BridgeProc, agent_state, cli
from tests.support import tempdirs

# The first run builds the image (debootstrap: minutes); a boot takes up to BOOT_TIMEOUT and the
# watchdog test waits for WatchdogSec=30 plus the restart.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RUN_TIMEOUT = 120.0  # one command in the guest
WATCHDOG_WAIT = 150.0  # SIGSTOP to a new active agent: WatchdogSec=30, RestartSec=1, then startup
POLL = 2.0


@dataclass
class Booted:
    image: SystemdImage
    guest: SystemdGuest
    ctl: GuestControl
    timings: dict[str, float] = field(default_factory=dict)
    analyze: str = ""

    def report(self) -> str:
        lines = ["image %s (built in %.1f s)" % (self.image.key, self.image.build_seconds)]
        lines += ["%s: %.1f s" % item for item in self.timings.items()]
        return "\n".join(lines + [self.analyze])


def _require_tools():
    missing = [t for t in (QEMU, "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.skip("missing %s (scripts/packages-test.txt)" % ", ".join(missing))


def run(ctl: GuestControl, *argv: str, timeout: float = RUN_TIMEOUT) -> str:
    """Run argv in the guest; its stdout (the test fails if it exits non-zero)."""
    r = ctl.run(list(argv), timeout=timeout)
    out = r.stdout.decode(errors="replace")
    assert r.rc == 0, "%s exited %d: %s%s" % (
        " ".join(argv),
        r.rc,
        out,
        r.stderr.decode(errors="replace"),
    )
    return out


def show(ctl: GuestControl, unit: str, *props: str) -> dict[str, str]:
    """``systemctl show`` properties of a unit, as a dict."""
    out = run(ctl, "systemctl", "show", unit, "-p", ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_names(value: str) -> list[str]:
    """The unit names of a list property: systemctl double-quotes names with special characters
    and doubles their backslashes (sys-devices-...-virtio\\x2dports-...), as a shell reads them."""
    return shlex.split(value)


@pytest.fixture(scope="module")
def booted():
    _require_tools()
    try:
        image = build_systemd_image()
    except ImageError as e:
        pytest.fail("cannot build the systemd guest image: %s" % e)
    with tempdirs.short_dir("ovmd-sd-") as workdir:
        guest = boot_systemd(image, workdir, serial_channel=True)
        try:
            ctl = guest.control()
            b = Booted(image, guest, ctl)
            b.timings["QEMU start to control answers"] = time.monotonic() - guest.started
            # Boot finished (or degraded: reported, the tests say what matters) before timing it.
            state = ctl.run(["systemctl", "is-system-running", "--wait"], timeout=RUN_TIMEOUT)
            b.timings["QEMU start to boot finished"] = time.monotonic() - guest.started
            b.analyze = "systemctl is-system-running: %s\n" % state.stdout.decode().strip()
            analyze = ctl.run(["systemd-analyze"], timeout=RUN_TIMEOUT)
            b.analyze += analyze.stdout.decode(errors="replace").strip()
            blame = ctl.run(["systemd-analyze", "blame"], timeout=RUN_TIMEOUT)
            b.analyze += "\nslowest units:\n" + "\n".join(
                blame.stdout.decode(errors="replace").splitlines()[:8]
            )
            print("\n" + b.report())
            yield b
        finally:
            guest.kill()


def test_udev_should_start_the_agent_when_its_port_appears(booted):
    ctl = booted.ctl
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        state = show(ctl, "ovmd.service", "ActiveState", "SubState", "Type", "WantedBy")
        if state["ActiveState"] == "active" or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    # Type=notify: "active" only once the agent sent READY=1.
    assert (state["ActiveState"], state["SubState"], state["Type"]) == (
        "active",
        "running",
        "notify",
    ), "%s\n%s" % (state, booted.report())
    ready = show(ctl, "ovmd.service", "ActiveEnterTimestampMonotonic")
    booted.timings["kernel start to ovmd active"] = (
        int(ready["ActiveEnterTimestampMonotonic"]) / 1e6
    )
    print("\n" + booted.report())
    # udev's SYSTEMD_WANTS lands on the port's sysfs device unit, not on the
    # dev-virtio\x2dports-com.oracle.ovmd.device alias (whose Wants= is empty).
    devices = [u for u in unit_names(state["WantedBy"]) if u.startswith("sys-devices-")]
    assert devices and devices[0].endswith(".device"), "WantedBy=%s" % state["WantedBy"]
    wants = show(ctl, devices[0], "Wants")["Wants"]
    assert "ovmd.service" in unit_names(wants), "%s Wants=%s" % (devices[0], wants)
    udev = run(ctl, "udevadm", "info", "/dev/virtio-ports/com.oracle.ovmd")
    assert "E: SYSTEMD_WANTS=ovmd.service" in udev, udev
    assert run(ctl, "systemctl", "is-active", "ovmd").strip() == "active"


def test_the_agent_should_serve_local_clients(booted):
    ctl = booted.ctl
    run(ctl, "ovmd", "-p", "e2e-systemd=hello there")
    assert run(ctl, "ovmd", "-g", "e2e-systemd") == "hello there\n"


def test_the_watchdog_should_restart_a_hung_agent(booted):
    ctl = booted.ctl
    before = show(ctl, "ovmd.service", "MainPID", "NRestarts", "ActiveState")
    pid = int(before["MainPID"])
    assert pid and before["ActiveState"] == "active", before
    # Acknowledged before the hang: the cache in /run/ovmd outlives the agent's process.
    run(ctl, "ovmd", "-p", "before-watchdog=kept")
    # The shell's builtin: the minimal guest has no procps.
    run(ctl, "sh", "-c", "kill -STOP %d" % pid)
    stopped = time.monotonic()
    deadline = stopped + WATCHDOG_WAIT
    seen = []
    while True:
        now = show(ctl, "ovmd.service", "MainPID", "NRestarts", "ActiveState", "SubState")
        seen.append(now)
        if (
            int(now["MainPID"]) not in (0, pid)
            and now["ActiveState"] == "active"
            and now["SubState"] == "running"
        ):
            break
        assert time.monotonic() < deadline, "no new active agent %.0f s after SIGSTOP: %s" % (
            WATCHDOG_WAIT,
            seen[-3:],
        )
        time.sleep(POLL)
    elapsed = time.monotonic() - stopped
    print("\nSIGSTOP to a new active agent: %.1f s (WatchdogSec=30)" % elapsed)
    assert int(now["NRestarts"]) > int(before["NRestarts"]), (before, now)
    journal = run(ctl, "journalctl", "-u", "ovmd.service", "--no-pager", "-o", "cat")
    assert "Watchdog timeout" in journal, journal[-3000:]
    # The new agent serves, with the cache the hung one left.
    assert run(ctl, "ovmd", "-g", "before-watchdog") == "kept\n"
    run(ctl, "ovmd", "-p", "after-watchdog=yes")
    assert run(ctl, "ovmd", "-g", "after-watchdog") == "yes\n"


def test_an_agent_on_a_serial_line_should_exchange_messages_with_the_bridge(booted):
    """The tty channel: an agent on /dev/ttyS1 (QEMU's isa-serial), the bridge on its socket."""
    ctl = booted.ctl
    sock = "/run/ovmd/ovmd.sock"
    # The package's unit for a serial line (it takes the place of ovmd.service, whose unit is
    # bound to the virtio port); Type=notify: systemctl returns once the agent is ready.
    run(ctl, "systemctl", "start", "ovmd-serial@ttyS1")
    try:
        assert run(ctl, "systemctl", "is-active", "ovmd-serial@ttyS1").strip() == "active"
        virtio = ctl.run(["systemctl", "is-active", "ovmd"], timeout=RUN_TIMEOUT)
        assert virtio.stdout.decode().strip() != "active"  # Conflicts=: one agent in /run/ovmd
        rc = ctl.run(["systemctl", "is-active", "serial-getty@ttyS1"], timeout=RUN_TIMEOUT)
        assert rc.stdout.decode().strip() != "active", "a getty holds the agent's line"
        with BridgeProc({"tty1": "unix:" + booted.guest.tty_socket}) as bridge:
            bridge.wait_ready()
            deadline = time.monotonic() + RUN_TIMEOUT
            while agent_state(bridge, "tty1") != "connected":
                assert time.monotonic() < deadline, "the agent on ttyS1 never connected"
                time.sleep(POLL)
            # Host to guest, acknowledged by the agent through the UART.
            sent = cli(bridge, "send", "tty1", "com.example.over-serial", "hello, ttyS1")
            assert (sent.returncode, sent.stdout) == (0, "Message sent successfully.\n")
            got = run(ctl, "ovmd", "--socket", sock, "-g", "com.example.over-serial")
            assert got == "hello, ttyS1\n"
            # Guest to host: a value of nearly the limit, every printable byte, through the line.
            big = "".join(chr(32 + i % 95) for i in range(8000))
            run(ctl, "ovmd", "--socket", sock, "-p", "guest.big=" + big)
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                q = cli(bridge, "query", "tty1", "guest.big", "--json")
                if q.returncode == 0 and json.loads(q.stdout)["value"] == big:
                    break
                assert time.monotonic() < deadline, q.stdout + q.stderr
                time.sleep(POLL)
    finally:
        ctl.run(["systemctl", "stop", "ovmd-serial@ttyS1"], timeout=RUN_TIMEOUT)
