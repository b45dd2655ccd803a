"""The .debs installed into a fresh system of the host's release (Debian 12 here; debootstrap
minbase, in a chroot: debian_chroot.py) with apt, as an operator would: together and each alone. The
installed commands run from the chroot with Debian's own python3, click and aiohttp (not the
project's venv); with both installed, a host bridge and a guest agent from the packages exchange a
message over a pty.

The first run builds the cached system (about a minute: debootstrap, package lists) and downloads
python3 and friends once; later runs take well under a minute each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.packaging import apt_sources
from tests.packaging.debian_chroot import Chroot, missing_tools
from tests.packaging.pkgbuild import VERSION, build_debs, require_root, require_tools
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DEADLINE = 60  # seconds to wait for a daemon in the chroot (a loaded 2-core machine)


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    require_root()
    missing = missing_tools()
    if missing:
        require_tools(*missing)
    try:
        apt_sources.debian_source()
    except LookupError as e:
        pytest.skip(str(e))
    return build_debs(tmp_path_factory.mktemp("debs"))


@pytest.fixture
def chroot(tmp_path):
    with Chroot(tmp_path) as c:
        yield c


def installed(chroot, package):
    r = chroot.run(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
    return r.returncode == 0 and "install ok installed" in r.stdout


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_the_guest_package_should_install_alone_and_run(debs, chroot):
    chroot.apt_install([debs["ovmd"]])
    assert installed(chroot, "ovmd")
    assert not installed(chroot, "hostbridge")
    assert not installed(chroot, "python3-aiohttp")  # a guest pulls in nothing of the host's
    assert chroot.run(["ovmd", "--version"]).stdout.strip() == "ovmd %s" % VERSION
    assert "--daemon" in chroot.run(["ovmd", "--help"]).stdout
    # No daemon running: the CLI says so in one line, with the documented exit code.
    r = chroot.run(["ovmd", "-l"], check=False)
    assert r.returncode == 3 and len(r.stdout.strip().splitlines()) == 1, r.stdout
    # Byte-compiled at install (py3compile), and the unit is left to udev: not enabled.
    assert os.path.isdir(chroot.path("/usr/lib/ovmd/ovmproto/__pycache__"))
    assert not os.path.lexists(
        chroot.path("/etc/systemd/system/multi-user.target.wants/ovmd.service")
    )
    assert os.path.exists(chroot.path("/lib/udev/rules.d/90-ovmd.rules"))
    # Template configuration: the built-in modules enabled, the first-boot unit enabled, unarmed.
    listing = chroot.run(["ovm-chkconfig", "--list"]).stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in listing[1:]}
    assert rows == {"authentication": "on:90", "datetime": "on:50", "network": "on:30",
                    "ssh": "on:60", "system": "off", "user": "on:70"}  # fmt: skip
    assert os.path.lexists(
        chroot.path(
            "/etc/systemd/system/multi-user.target.wants/ovm-template-initial-config.service"
        )
    )
    r = chroot.run(["ovm-template-initial-config"])
    assert r.stdout.startswith("first boot configuration is not armed")


def test_the_host_package_should_install_alone_enabled_with_its_group(debs, chroot):
    chroot.apt_install([debs["hostbridge"]])
    assert installed(chroot, "hostbridge")
    assert not installed(chroot, "ovmd")
    assert "Usage: vmmessage" in chroot.run(["vmmessage", "--help"]).stdout
    assert "usage: hostbridge" in chroot.run(["hostbridge", "--help"]).stdout
    assert "ovm_vmmessage" in chroot.run(["ovm_vmmessage", "--help"]).stdout
    assert chroot.run(["getent", "group", "hostbridge"]).stdout.startswith("hostbridge:")
    wants = chroot.path("/etc/systemd/system/multi-user.target.wants/hostbridge.service")
    assert os.readlink(wants) == "/lib/systemd/system/hostbridge.service"
    # Purge leaves nothing of ours behind (py3clean removes the compiled files).
    chroot.run(["apt-get", "purge", "-y", "-q", "hostbridge"], timeout=300)
    assert not os.path.exists(chroot.path("/usr/lib/hostbridge"))
    assert not os.path.lexists(wants)


def test_both_packages_should_install_together(debs, chroot):
    chroot.apt_install([debs["ovmd"], debs["hostbridge"]])
    assert installed(chroot, "ovmd") and installed(chroot, "hostbridge")
    assert chroot.run(["ovmd", "--version"]).stdout.strip() == "ovmd %s" % VERSION
    assert "Usage: vmmessage" in chroot.run(["vmmessage", "--help"]).stdout
    assert "usage: hostbridge" in chroot.run(["hostbridge", "--help"]).stdout
    # Each package's copy of the protocol code and the shared plumbing, side by side.
    for private in ("/usr/lib/ovmd", "/usr/lib/hostbridge"):
        assert os.path.exists(chroot.path(private + "/ovmproto/framing.py"))
        assert os.path.exists(chroot.path(private + "/ovmsys/notify.py"))


# With Debian's own aiohttp 3.8.4 and no orjson: this found api.py importing orjson and using
# web.AppKey (aiohttp 3.9+), both fixed.
def test_the_installed_bridge_and_agent_should_pass_a_message(debs, chroot):
    chroot.apt_install([debs["ovmd"], debs["hostbridge"]])
    exchange_a_message(chroot)


def exchange_a_message(chroot):
    """The installed bridge (Debian's aiohttp) and agent (Debian's click) over a pty in the chroot:
    host -> guest while the agent is not yet running, then guest -> host."""
    chroot.mount_devpts()
    os.makedirs(chroot.path("/tmp/t"))
    api = "/tmp/t/api.sock"
    guest_sock = "/tmp/t/ovmd.sock"
    bridge = chroot.popen(
        [
            "hostbridge",
            "--no-discover",
            "--vm",
            "vm1=pty:/tmp/t/vm1",
            "--db",
            "/tmp/t/bridge.sqlite3",
            "--api-socket",
            api,
            "-d",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    agent = None
    try:
        wait_for(
            lambda: (
                bridge.poll() is not None
                or (os.path.exists(chroot.path(api)) and os.path.lexists(chroot.path("/tmp/t/vm1")))
            ),
            DEADLINE,
            interval=0.2,
            what="the bridge's API socket and pty",
        )
        assert bridge.poll() is None, bridge.stderr.read().decode()
        sent = chroot.run(["vmmessage", "--bridge", api, "send", "vm1", "from.host", "hello"])
        assert "queued" in sent.stdout.lower(), sent.stdout

        agent = chroot.popen(
            [
                "ovmd",
                "--daemon",
                "--channel",
                "/tmp/t/vm1",
                "--socket",
                guest_sock,
                "--state-dir",
                "/tmp/t/state",
                "--config",
                "/nonexistent",
                "-d",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def guest_has_it():
            r = chroot.run(
                ["ovmd", "--socket", guest_sock, "--config", "/nonexistent", "-g", "from.host"],
                check=False,
            )
            return r.returncode == 0 and r.stdout.strip() == "hello"

        wait_for(
            lambda: agent.poll() is not None or guest_has_it(),
            DEADLINE,
            interval=0.2,
            what="the guest to get the key",
        )
        assert agent.poll() is None, agent.stderr.read().decode()

        chroot.run(
            ["ovmd", "--socket", guest_sock, "--config", "/nonexistent", "-p", "from.guest=world"]
        )

        def host_sees_it():
            r = chroot.run(
                ["vmmessage", "--bridge", api, "query", "vm1", "from.guest"], check=False
            )
            return r.returncode == 0 and "'world'" in r.stdout

        wait_for(host_sees_it, DEADLINE, interval=0.2, what="the host to see the guest's key")
    finally:
        for proc in (agent, bridge):
            if proc is not None:
                stop(proc)


def test_the_cockpit_page_should_install_with_the_bridge_and_cockpit_bridge_list_it(debs, chroot):
    chroot.apt_install([debs["hostbridge"], debs["hostbridge-cockpit"]])
    assert installed(chroot, "hostbridge-cockpit") and installed(chroot, "cockpit-bridge")
    for name in ("manifest.json", "index.html", "hostbridge.js", "hostbridge.css"):
        assert os.path.isfile(chroot.path("/usr/share/cockpit/hostbridge/" + name))
    # Debian's cockpit-bridge finds the page where the package put it, with its default socket.
    listed = chroot.run(["cockpit-bridge", "--packages"]).stdout
    assert re.search(r"^hostbridge\s.*/usr/share/cockpit/hostbridge$", listed, re.M), listed
