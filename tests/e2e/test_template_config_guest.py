"""Template configuration proven in a real Debian 12 guest booting systemd (systemd_image.py): the
host's `vmmessage configure` queued before the VM starts, the first boot applying it, the report
read back by the host; then `ovmd -s cleanup`, a reboot and a second configuration; then a module
that fails, reported with the others' work left in place.

Real parts all the way: the bridge daemon connected to QEMU's socket for the agent's port, the
`vmmessage` command, the guest's udev, systemd, ovmd.service, ovm-template-initial-config.service,
ifupdown, chpasswd and useradd. The disk is a copy of the cached image, armed for its first boot
as an image build seals a template (INITIAL_CONFIG=yes, written with debugfs); it persists across
the reboot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.e2e.qemu import QEMU, GuestControl
from tests.e2e.systemd_guest import _persistent_disk, boot_systemd
from tests.e2e.systemd_image import ImageError, build_systemd_image
from tests.hostbridge.bridge_harness import BridgeProc, cli, cli_popen
from tests.support import tempdirs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RUN_TIMEOUT = 120.0
CONFIGURED_TIMEOUT = 600.0  # boot under emulation on a loaded machine, then the modules
SETTINGS = "/etc/sysconfig/ovm-template-initial-config"
FIRST = {"hostname": "vm1.example.com", "ip": "192.0.2.10", "dns": "192.0.2.53",
         "password": "First-boot root pw 1"}  # fmt: skip
# The second configuration takes its address by DHCP (QEMU's user network gives 10.0.2.15) and
# turns NTP on; its DNS server still wins over the DHCP server's.
SECOND = {"hostname": "vm1b.example.org", "dhcp": "10.0.2.15", "dns": "198.51.100.53",
          "password": "Second root pw 2", "ntp": "ntp.example.org"}  # fmt: skip


def run(ctl: GuestControl, *argv: str, stdin: bytes | None = None, ok: bool = True):
    r = ctl.run(list(argv), timeout=RUN_TIMEOUT, stdin=stdin)
    out = r.stdout.decode(errors="replace")
    if ok:
        assert r.rc == 0, "%s exited %d: %s%s" % (
            " ".join(argv), r.rc, out, r.stderr.decode(errors="replace"))  # fmt: skip
    return r.rc, out


# Run in the guest, the password on stdin: whether it verifies against /etc/shadow's hash.
VERIFY = """
import crypt, sys, warnings
warnings.simplefilter("ignore")
user, pw = sys.argv[1], sys.stdin.read()
for line in open("/etc/shadow"):
    f = line.split(":")
    if f[0] == user:
        sys.exit(0 if crypt.crypt(pw, f[1]) == f[1] else 1)
sys.exit(2)
"""


def password_verifies(ctl, user, password):
    rc, _ = run(ctl, "python3", "-c", VERIFY, user, stdin=password.encode(), ok=False)
    return rc == 0


def arm_first_boot(disk, workdir):
    """Set INITIAL_CONFIG=yes in the disk image, as `ovmd -s cleanup` would have in the template
    (debugfs writes into the ext4 image without mounting it)."""
    local = os.path.join(workdir, "settings")
    with open(local, "w") as f:
        f.write("INITIAL_CONFIG=yes\nINITIAL_CONFIG_TIMEOUT=900\n")
    for request in ("rm %s" % SETTINGS, "write %s %s" % (local, SETTINGS)):
        subprocess.run(["debugfs", "-w", "-R", request, disk], check=True, capture_output=True)


def send_configuration(bridge, cfg, key_file, pw_file, *extra, wait=False):
    with open(pw_file, "w") as f:
        f.write(cfg["password"] + "\n")
    if "ip" in cfg:
        address = ["--ip", cfg["ip"] + "/24", "--gateway", cfg["ip"].rsplit(".", 1)[0] + ".1"]
    else:
        address = ["--dhcp"]
    if "ntp" in cfg:
        address += ["--ntp-server", cfg["ntp"]]
    args = ["configure", "vm1", "--hostname", cfg["hostname"], *address, "--dns", cfg["dns"],
            "--search", "example.com", "--account", "deploy", "--groups", "sudo",
            "--ssh-key", key_file, "--root-password-file", pw_file, *extra]  # fmt: skip
    if wait:
        args += ["--wait", "--timeout", str(CONFIGURED_TIMEOUT)]
    return cli_popen(bridge, *args)


def assert_configured(ctl, cfg, key):
    _, hostname = run(ctl, "hostname")
    assert hostname.strip() == cfg["hostname"]
    _, etc_hostname = run(ctl, "cat", "/etc/hostname")
    assert etc_hostname == cfg["hostname"] + "\n"
    _, addr = run(ctl, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert " %s/24 " % cfg.get("ip", cfg.get("dhcp")) in addr, addr
    if "dhcp" in cfg:
        _, leases = run(ctl, "sh", "-c", "cat /var/lib/dhcp/dhclient*.leases")
        assert "fixed-address %s;" % cfg["dhcp"] in leases, leases
    if "ntp" in cfg:
        _, ntp = run(ctl, "systemctl", "is-active", "systemd-timesyncd")
        assert ntp.strip() == "active"
        _, conf = run(ctl, "cat", "/etc/systemd/timesyncd.conf.d/50-ovm-template-config.conf")
        assert conf == "[Time]\nNTP=%s\n" % cfg["ntp"]
    _, resolv = run(ctl, "cat", "/etc/resolv.conf")
    assert "nameserver %s" % cfg["dns"] in resolv and "search example.com" in resolv, resolv
    assert password_verifies(ctl, "root", cfg["password"])
    assert not password_verifies(ctl, "root", cfg["password"] + "x")
    _, keys = run(ctl, "cat", "/home/deploy/.ssh/authorized_keys")
    assert keys == key + "\n"
    _, groups = run(ctl, "id", "-nG", "deploy")
    assert "sudo" in groups.split()
    # The secret is gone from the agent's cache, and no log holds it.
    rc, _ = run(ctl, "ovmd", "-g", "com.oracle.linux.root-password", ok=False)
    assert rc == 1
    _, journal = run(ctl, "journalctl", "-b", "--no-pager")
    _, runlog = run(ctl, "cat", "/var/log/ovm-template-config.log")
    assert cfg["password"] not in journal + runlog
    assert "first boot: done" in runlog


def wait_configured(sender):
    out, err = sender.communicate(timeout=CONFIGURED_TIMEOUT + 60)
    assert sender.returncode == 0, out + err
    return out


@pytest.fixture(scope="module")
def image():
    missing = [t for t in (QEMU, "debootstrap", "debugfs") if shutil.which(t) is None]
    if missing:
        pytest.skip("missing %s (scripts/packages-test.txt)" % ", ".join(missing))
    try:
        return build_systemd_image()
    except ImageError as e:
        pytest.fail("cannot build the systemd guest image: %s" % e)


def test_a_template_should_configure_itself_at_first_boot_then_again_after_cleanup(image, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy@host",
                    "-f", str(tmp_path / "deploy")], check=True)  # fmt: skip
    key = (tmp_path / "deploy.pub").read_text().strip()
    pw_file = str(tmp_path / "pw")
    timings = {}
    with tempdirs.short_dir("ovmd-tc-") as workdir:
        arm_first_boot(_persistent_disk(image, workdir), workdir)
        channel = os.path.join(workdir, "agent.sock")  # QEMU serves it once the VM runs
        with BridgeProc({"vm1": "unix:" + channel}) as bridge:
            bridge.wait_ready()
            # 1. Sent before the VM exists: queued, then followed to the guest's report.
            sender = send_configuration(bridge, FIRST, str(tmp_path / "deploy.pub"), pw_file,
                                        wait=True)  # fmt: skip
            guest = boot_systemd(image, workdir, persistent=True)
            try:
                out = wait_configured(sender)
                timings["first boot: QEMU start to configured"] = time.monotonic() - guest.started
                queued = "queued until its agent connects (they are delivered in order at its "
                assert out.splitlines()[0].endswith(queued + "first boot).")
                assert out.splitlines()[1:] == [
                    "Template configuration of VM 'vm1': done.",
                    "  authentication  ok",
                    "  datetime        ok",
                    "  network         ok",
                    "  ssh             ok",
                    "  user            ok",
                ]
                ctl = guest.control()
                assert_configured(ctl, FIRST, key)
                _, settings = run(ctl, "cat", SETTINGS)
                assert "INITIAL_CONFIG=no" in settings
                _, machine_id = run(ctl, "cat", "/etc/machine-id")
                _, host_key = run(ctl, "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
                # 2. Seal it again; the next boot is a first boot.
                _, cleaned = run(ctl, "ovmd", "-s", "cleanup")
                assert cleaned.splitlines() == [
                    "cleanup: network ok",
                    "cleanup: ssh ok",
                    "cleanup: system ok",
                ]
                guest.poweroff(ctl)
            finally:
                guest.kill()
            # 3. A second configuration, queued while the VM is off.
            sender = send_configuration(bridge, SECOND, str(tmp_path / "deploy.pub"), pw_file,
                                        wait=True)  # fmt: skip
            guest = boot_systemd(image, workdir, persistent=True)
            try:
                wait_configured(sender)
                timings["second boot: QEMU start to configured"] = time.monotonic() - guest.started
                ctl = guest.control()
                assert_configured(ctl, SECOND, key)
                assert not password_verifies(ctl, "root", FIRST["password"])
                _, new_id = run(ctl, "cat", "/etc/machine-id")
                assert new_id.strip() and new_id != machine_id
                _, new_key = run(ctl, "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
                assert new_key != host_key, "the host keys were not made anew"
                _, ssh = run(ctl, "systemctl", "is-active", "ssh", ok=False)
                assert ssh.strip() == "active"
                # 4. A module that fails: an invalid address. The host sends, the guest runs
                # reconfigure on the agent's keys; network refuses before changing anything,
                # the modules after it still run.
                hashed = password_hash(SECOND["password"])
                n = "com.oracle.linux.network."
                sender = cli_popen(bridge, "configure", "vm1", "--set", n + "bootproto.0=static",
                                   "--set", n + "ipaddr.0=198.51.100.300",
                                   "--set", n + "netmask.0=255.255.255.0",
                                   "--timezone", "Europe/Paris", "--root-password-hash", hashed,
                                   "--wait", "--json", "--timeout", "300", )  # fmt: skip
                # The root password is sent last: once the guest has it, it has them all.
                wait_for_key(bridge, "com.oracle.linux.root-password", "{crypt}" + hashed)
                rc, out = run(ctl, "ovmd", "-s", "reconfigure", ok=False)
                assert rc == 1
                error = "com.oracle.linux.network.ipaddr.0: not an IPv4 address"
                assert out.splitlines() == [
                    "reconfigure: network failed: " + error,
                    "reconfigure: datetime ok",
                    "reconfigure: user ok",
                    "reconfigure: authentication ok",
                ]
                report, err = sender.communicate(timeout=360)
                assert sender.returncode == 8, err
                assert json.loads(report)["report"] == {
                    "state": "failed",
                    "error": "network: " + error,
                    "modules": {
                        "network": "failed: " + error,
                        "datetime": "ok",
                        "user": "ok",
                        "authentication": "ok",
                    },
                }
                _, zone = run(ctl, "readlink", "/etc/localtime")
                assert zone.strip() == "/usr/share/zoneinfo/Europe/Paris"
                _, addr = run(ctl, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
                assert " %s/24 " % SECOND["dhcp"] in addr  # the earlier network, untouched
                assert password_verifies(ctl, "root", SECOND["password"])
            finally:
                guest.kill()
    print("\n" + "\n".join("%s: %.1f s" % t for t in timings.items()))


def password_hash(password):
    from templateconfig.builtin.passwords import hash_password

    return hash_password(password)


def wait_for_key(bridge, key, value, timeout=RUN_TIMEOUT):
    """Until the guest holds ``key`` = ``value`` (the host's send was delivered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli(bridge, "query", "vm1", key, "--json")
        if r.returncode == 0 and json.loads(r.stdout).get("value") == value:
            return
        time.sleep(1)
    raise AssertionError("%s never reached the guest" % key)
