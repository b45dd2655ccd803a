"""`vmmessage configure`: a whole template configuration from the host to a guest's first boot,
with real processes all the way: the bridge, a real agent on a pty channel, `vmmessage` as users
run it, and the guest's `ovm-template-initial-config` with the built-in modules (changing a system
tree, its commands recorded instead of run)."""

import json
import os
import subprocess

import pytest

from ovmproto import templatekeys as tk
from tests.hostbridge.bridge_harness import BridgeProc, agent_state, cli, cli_popen
from tests.support.agent import Agent
from tests.support.processes import child_env, script
from tests.support.waiting import wait_for
from tests.templateconfig.support import commands, system_root, template_dir

PASSWORD = "Root-pw-never-logged-7"


def configure_cmd(bridge, *args):
    return cli_popen(bridge, "configure", *args)


def first_boot(tmp_path, agent):
    settings = tmp_path / "ovm-template-initial-config"
    settings.write_text("INITIAL_CONFIG=yes\nINITIAL_CONFIG_TIMEOUT=60\n")
    env = {
        "OVM_TEMPLATE_SETTINGS": str(settings),
        "OVM_TEMPLATE_DIR": str(template_dir(tmp_path)),
        "OVM_TEMPLATE_ROOT": str(system_root(tmp_path)),
        "OVM_TEMPLATE_COMMANDS": str(tmp_path / "commands"),
        "OVM_TEMPLATE_CONFIG_LOG": str(tmp_path / "run.log"),
        "OVMD_SOCKET": agent.socket,
    }
    return subprocess.run(
        [script("ovm-template-initial-config")],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def bridge(short_dir):
    with BridgeProc({"vm1": "pty:" + os.path.join(short_dir, "vm1.pty")}) as b:
        b.wait_ready()
        yield b


def start_agent(bridge, short_dir):
    agent = Agent(os.path.join(short_dir, "vm1.pty"))
    agent.start().wait_ready()
    wait_for(lambda: agent_state(bridge, "vm1") == "connected", what="vm1's agent")
    return agent


def test_a_configuration_sent_before_boot_should_be_applied_at_first_boot_and_reported(
    tmp_path, short_dir, bridge
):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    # Sent while the VM is down: queued, then --wait follows the report.
    settings = ["--hostname", "vm1.example.com", "--ip", "192.0.2.10/24", "--gateway",
                "192.0.2.1", "--dns", "192.0.2.53", "--root-password-file", str(pw)]  # fmt: skip
    sender = configure_cmd(bridge, "vm1", *settings, "--wait", "--timeout", "120")
    agent = start_agent(bridge, short_dir)
    try:
        wait_for(lambda: os.path.exists(agent.state_dir), what="the agent's state")
        booted = first_boot(tmp_path, agent)
        out, err = sender.communicate(timeout=120)
    finally:
        sender.kill()
        agent.close()
    assert booted.returncode == 0, booted.stderr
    assert sender.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "Configuration sent to VM 'vm1': 8 messages, 8 queued until its agent connects "
        "(they are delivered in order at its first boot)."
    )
    assert lines[1:] == [
        "Template configuration of VM 'vm1': done.",
        "  authentication  ok",
        "  datetime        ok",
        "  network         ok",
        "  ssh             ok",
        "  user            ok",
    ]
    root = tmp_path / "root"
    assert (root / "etc/hostname").read_text() == "vm1.example.com\n"
    assert "address 192.0.2.10/24" in (root / "etc/network/interfaces.d/ovm-eth0").read_text()
    assert ["chpasswd", "-e", "-R", str(root)] in commands(tmp_path / "commands")
    # The password: unlogged on the host, gone from the guest's cache.
    audit = cli(bridge, "audit", "vm1")
    assert PASSWORD not in audit.stdout + bridge.log()
    assert cli(bridge, "query", "vm1", tk.ROOT_PASSWORD_KEY).returncode == 1


def test_a_module_failure_should_be_printed_in_one_line_with_exit_8(tmp_path, short_dir, bridge):
    agent = start_agent(bridge, short_dir)
    try:
        sender = configure_cmd(
            bridge, "vm1", "--set", "com.oracle.linux.network.ipaddr.0=192.0.2.300",
            "--set", "com.oracle.linux.network.netmask.0=255.255.255.0",
            "--root-password-hash", "$6$salt$" + "a" * 86, "--wait", "--json",
        )  # fmt: skip
        booted = first_boot(tmp_path, agent)
        out, err = sender.communicate(timeout=120)
    finally:
        agent.close()
    assert booted.returncode == 1
    assert sender.returncode == 8, err
    doc = json.loads(out)
    assert doc["messages"] == 4 and doc["queued"] == 0
    assert doc["report"] == {
        "state": "failed",
        "error": "network: com.oracle.linux.network.ipaddr.0: not an IPv4 address",
        "modules": {
            "network": "failed: com.oracle.linux.network.ipaddr.0: not an IPv4 address",
            "datetime": "ok",
            "ssh": "ok",
            "user": "ok",
            "authentication": "ok",
        },
    }


def test_no_report_in_time_should_exit_4_in_one_line(bridge):
    sender = configure_cmd(bridge, "vm1", "--root-password-hash", "$6$salt$" + "a" * 86,
                           "--wait", "--timeout", "1")  # fmt: skip
    _out, err = sender.communicate(timeout=60)
    assert sender.returncode == 4
    assert err.startswith("vmmessage: error: no report of the template configuration from VM 'vm1'")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "args, reason",
    [
        ((), "no root password"),
        (("--ip", "192.0.2.10", "--root-password-hash", "x"), "--ip: give the prefix length"),
        (("--ssh-key", "/dev/null", "--root-password-hash", "x"), "--ssh-key goes with --account"),
        (("--file", "/nonexistent.toml", "--root-password-hash", "x"), "/nonexistent.toml"),
        (("--set", "bad\x1bkey=1", "--root-password-hash", "x"), "control character"),
    ],
)
def test_bad_settings_should_be_a_usage_error_before_anything_is_sent(bridge, args, reason):
    done = configure_cmd(bridge, "vm1", *args)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 2 and out == ""
    assert err.startswith("vmmessage: error: ") and reason in err and err.count("\n") == 1
    assert json.loads(cli(bridge, "queue", "vm1", "--json").stdout)["messages"] == []


def test_a_toml_file_should_give_full_keys_in_order_with_the_password_last(tmp_path, bridge):
    f = tmp_path / "vm1.toml"
    f.write_text(
        '"com.oracle.linux.root-password" = "from-file-pw"\n'
        '[com.oracle.linux.network]\nhostname = "vm1.example.com"\n"dns-servers.0" = "192.0.2.53"\n'
        "[com.oracle.linux.datetime]\nntp = true\n"
    )
    done = configure_cmd(bridge, "vm1", "--file", str(f), "--timezone", "Europe/Paris")
    _out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    queue = json.loads(cli(bridge, "queue", "vm1", "--json").stdout)["messages"]
    assert [m["key"] for m in queue] == [
        tk.REQUEST_KEY,
        "com.oracle.linux.network.hostname",
        "com.oracle.linux.network.dns-servers.0",
        "com.oracle.linux.datetime.ntp",
        "com.oracle.linux.datetime.timezone",
        tk.ROOT_PASSWORD_KEY,
    ]
    assert "from-file-pw" not in cli(bridge, "audit", "vm1").stdout


def test_dhcp_should_first_delete_an_earlier_static_address_in_the_guest(
    tmp_path, short_dir, bridge
):
    agent = start_agent(bridge, short_dir)
    try:
        net = "com.oracle.linux.network."
        for key, value in (("ipaddr.0", "192.0.2.10"), ("netmask.0", "255.255.255.0")):
            assert cli(bridge, "send", "vm1", net + key, value).returncode == 0
        done = configure_cmd(bridge, "vm1", "--dhcp", "--root-password-hash", "$6$s$" + "a" * 86)
        out, err = done.communicate(timeout=60)
        assert done.returncode == 0, err
        keys = json.loads(cli(bridge, "keys", "vm1", "--json").stdout)["entries"]
        held = {e["key"]: e["value"] for e in keys}
        assert held[net + "bootproto.0"] == "dhcp"
        assert net + "ipaddr.0" not in held and net + "netmask.0" not in held
        # The guest's network module would now take it: no static address beside DHCP.
        assert out.startswith("Configuration sent to VM 'vm1': 6 messages, all delivered.")
    finally:
        agent.close()
