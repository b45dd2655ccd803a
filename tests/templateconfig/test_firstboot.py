"""The first boot against the real agent daemon, the host's keys arriving over its (pty) channel:
the wait for the root password, the run, the report in guest keys, the secrets deleted, the flag
cleared; a timeout; a module that fails. The built-in modules change a system tree."""

import os
import subprocess
import time

import pytest

from ovmproto.messages import Get, Set
from templateconfig import ERROR_KEY, MODULE_KEY_PREFIX, REQUEST_KEY, RUN_KEY, STATE_KEY
from tests.guestagent.harness import Daemon, Host
from tests.support.processes import child_env, script
from tests.support.waiting import wait_for
from tests.templateconfig.support import commands, system_root, template_dir

N = "com.oracle.linux.network."
PASSWORD = "com.oracle.linux.root-password"


@pytest.fixture
def guest(tmp_path):
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello(epoch="epoch-" + os.urandom(4).hex())
        host.seq = 0
        yield daemon, host


def send(host, key, value):
    host.seq += 1
    host.request(Set, key=key, value=value, seq=host.seq)


def value(host, key):
    reply = host.request(Get, key=key)
    return getattr(reply, "value", None)


def start(tmp_path, daemon, timeout=60, builtin=("network", "authentication"), armed=True):
    settings = tmp_path / "ovm-template-initial-config"
    flag = "yes" if armed else "no"
    settings.write_text("INITIAL_CONFIG=%s\nINITIAL_CONFIG_TIMEOUT=%s\n" % (flag, timeout))
    template = template_dir(tmp_path, builtin=builtin)
    root = system_root(tmp_path)
    env = {
        "OVM_TEMPLATE_SETTINGS": str(settings),
        "OVM_TEMPLATE_DIR": str(template),
        "OVM_TEMPLATE_ROOT": str(root),
        "OVM_TEMPLATE_COMMANDS": str(tmp_path / "commands"),
        "OVM_TEMPLATE_CONFIG_LOG": str(tmp_path / "run.log"),
        "OVMD_SOCKET": daemon.socket,
    }
    proc = subprocess.Popen(
        [script("ovm-template-initial-config")],
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, settings, root


def test_it_should_wait_for_the_password_then_configure_report_and_forget_the_secret(
    tmp_path, guest
):
    daemon, host = guest
    proc, settings, root = start(tmp_path, daemon)
    try:
        wait_for(lambda: value(host, STATE_KEY) == "waiting", what="the waiting state")
        send(host, REQUEST_KEY, "run-42")
        send(host, N + "hostname", "vm1.example.com")
        send(host, N + "ipaddr.0", "192.0.2.10")
        send(host, N + "netmask.0", "255.255.255.0")
        time.sleep(0.5)
        assert proc.poll() is None, "it ran before the root password came"
        send(host, PASSWORD, "first boot pw")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert value(host, STATE_KEY) == "done"
    assert value(host, RUN_KEY) == "run-42"
    assert value(host, ERROR_KEY) == ""
    assert value(host, MODULE_KEY_PREFIX + "network") == "ok"
    assert value(host, MODULE_KEY_PREFIX + "authentication") == "ok"
    assert value(host, PASSWORD) is None, "the password is still in the cache"
    assert value(host, N + "hostname") == "vm1.example.com"  # not a secret: kept
    # The password went to chpasswd (on its stdin, never logged: test_accounts.py runs it).
    assert ["chpasswd", "-e", "-R", str(root)] in commands(tmp_path / "commands")
    assert (root / "etc/hostname").read_text() == "vm1.example.com\n"
    assert "INITIAL_CONFIG=no" in settings.read_text()
    assert "first boot pw" not in out + err + (tmp_path / "run.log").read_text()
    assert "first boot pw" not in daemon.cache_file_bytes().decode("utf-8", "replace")


def test_a_module_that_fails_should_be_reported_and_the_others_work_kept(tmp_path, guest):
    daemon, host = guest
    send(host, N + "ipaddr.0", "192.0.2.300")
    send(host, N + "netmask.0", "255.255.255.0")
    send(host, PASSWORD, "pw")
    proc, settings, root = start(tmp_path, daemon)
    _out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    error = "network: com.oracle.linux.network.ipaddr.0: not an IPv4 address"
    assert value(host, STATE_KEY) == "failed"
    assert value(host, ERROR_KEY) == error
    assert value(host, MODULE_KEY_PREFIX + "network") == "failed: " + error.split(": ", 1)[1]
    assert value(host, MODULE_KEY_PREFIX + "authentication") == "ok"
    assert ["chpasswd", "-e", "-R", str(root)] in commands(tmp_path / "commands")
    assert value(host, PASSWORD) is None
    assert "INITIAL_CONFIG=no" in settings.read_text()  # once, failure or not


def test_without_the_password_in_time_nothing_is_configured_and_it_stays_armed(tmp_path, guest):
    daemon, host = guest
    send(host, N + "hostname", "vm1.example.com")
    proc, settings, root = start(tmp_path, daemon, timeout=1)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4
    assert err == (
        "ovm-template-initial-config: com.oracle.linux.root-password did not arrive within 1s\n"
    )
    assert value(host, STATE_KEY) == "timeout"
    assert not (root / "etc/hostname").exists()
    assert "INITIAL_CONFIG=yes" in settings.read_text()


def test_not_armed_it_should_do_nothing(tmp_path, guest):
    daemon, host = guest
    proc, _, _ = start(tmp_path, daemon, armed=False)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    assert out.startswith("first boot configuration is not armed")
    assert value(host, STATE_KEY) is None
