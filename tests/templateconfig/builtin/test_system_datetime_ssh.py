"""Modules datetime, ssh and system on a system tree: the files they write or remove."""

import os

import pytest

from templateconfig.builtin import datetime as dtmod
from templateconfig.builtin import ssh, system
from templateconfig.builtin.base import System
from templateconfig.common import TemplateError
from tests.templateconfig.support import commands, system_root

D = "com.oracle.linux.datetime."


def test_timezone_utc_and_ntp_servers_with_timesyncd(tmp_path):
    root = system_root(tmp_path)
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd-timesyncd").write_text("")
    (root / "etc/debian_version").write_text("12\n")
    pairs = {D + "timezone": "Europe/Paris", D + "utc": "False", D + "ntp": "True",
             D + "ntp-servers": "ntp1.example.com, 192.0.2.123"}  # fmt: skip
    dtmod.MODULE.run("configure", pairs, System(str(root), str(tmp_path / "c")))
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Paris"
    assert (root / "etc/timezone").read_text() == "Europe/Paris\n"
    assert (root / "etc/adjtime").read_text().splitlines()[2] == "LOCAL"
    dropin = root / "etc/systemd/timesyncd.conf.d/50-ovm-template-config.conf"
    assert dropin.read_text() == "[Time]\nNTP=ntp1.example.com 192.0.2.123\n"
    assert ["systemctl", "enable", "--now", "systemd-timesyncd.service"] in commands(tmp_path / "c")


def test_rhel_chrony_should_get_its_servers_in_a_block_of_chrony_conf(tmp_path):
    root = system_root(tmp_path)
    (root / "usr/sbin/chronyd").write_text("")
    (root / "usr/sbin/chronyd").chmod(0o755)
    (root / "etc/chrony.conf").write_text("pool 2.rhel.pool.ntp.org iburst\ndriftfile /x\n")
    pairs = {D + "ntp-servers": "192.0.2.123", D + "ntp": "yes"}
    dtmod.MODULE.run("configure", pairs, System(str(root), str(tmp_path / "c")))
    conf = (root / "etc/chrony.conf").read_text().splitlines()
    assert conf[:2] == ["#pool 2.rhel.pool.ntp.org iburst", "driftfile /x"]
    assert conf[2:] == [dtmod.CHRONY_BEGIN, "server 192.0.2.123 iburst", dtmod.CHRONY_END]
    assert ["systemctl", "enable", "--now", "chronyd.service"] in commands(tmp_path / "c")


@pytest.mark.parametrize(
    "pairs, message",
    [
        ({D + "timezone": "Mars/Olympus"}, D + "timezone: not a time zone"),
        ({D + "timezone": "../../etc/passwd"}, D + "timezone: not a time zone"),
        ({D + "datetime": "2011-4-7"}, D + "datetime: not year-month-day"),
        ({D + "ntp": "perhaps"}, D + "ntp: not True or False"),
        ({D + "ntp": "True"}, D + "ntp: no NTP client installed"),
    ],
)
def test_bad_datetime_keys_should_be_refused_before_anything_changes(tmp_path, pairs, message):
    root = system_root(tmp_path)
    with pytest.raises(TemplateError) as e:
        dtmod.MODULE.run("configure", dict(pairs, **{D + "utc": "True"}),
                         System(str(root), str(tmp_path / "c")))  # fmt: skip
    assert str(e.value).startswith(message)
    assert not (root / "etc/adjtime").exists() and not os.path.lexists(root / "etc/localtime")


def test_ssh_cleanup_should_remove_host_keys_and_configure_should_make_them(tmp_path):
    root = system_root(tmp_path)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config"):
        (root / "etc/ssh" / name).write_text("x")
    ssh.MODULE.run("cleanup", {}, System(str(root)))
    assert [p.name for p in (root / "etc/ssh").iterdir()] == ["sshd_config"]
    ssh.MODULE.run("configure", {}, System(str(root), str(tmp_path / "c")))
    assert commands(tmp_path / "c")[0] == ["ssh-keygen", "-A", "-f", str(root)]


def test_ssh_configure_should_really_make_keys_in_a_tree(tmp_path):
    root = system_root(tmp_path)
    os.unlink(root / "usr/sbin/ssh-keygen")
    os.symlink("/usr/bin/ssh-keygen", root / "usr/sbin/ssh-keygen")
    ssh.MODULE.run("configure", {}, System(str(root)))
    assert "ssh_host_ed25519_key" in os.listdir(root / "etc/ssh")


def test_system_cleanup_should_seal_the_image(tmp_path):
    root = system_root(tmp_path)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("0123\n")
    (root / "var/log/journal/abc").mkdir(parents=True)
    (root / "var/log/journal/abc/system.journal").write_text("j")
    (root / "var/log/dpkg.log").write_text("installed things\n")
    (root / "var/log/ovm-template-config.log").write_text("run\n")
    (root / "etc/sysconfig").mkdir(parents=True)
    (root / "etc/sysconfig/ovm-template-initial-config").write_text(
        "# first boot\nINITIAL_CONFIG=no\nINITIAL_CONFIG_TIMEOUT=60\n"
    )
    system.MODULE.run("cleanup", {}, System(str(root), str(tmp_path / "c")))
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert os.listdir(root / "var/log/journal/abc") == []
    assert (root / "var/log/dpkg.log").read_text() == ""
    assert not (root / "var/log/ovm-template-config.log").exists()
    assert (root / "etc/sysconfig/ovm-template-initial-config").read_text() == (
        "# first boot\nINITIAL_CONFIG_TIMEOUT=60\nINITIAL_CONFIG=yes\n"
    )
    assert commands(tmp_path / "c") == [["ovmd", "-x"]]
