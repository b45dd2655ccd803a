"""`ovm_vmmessage`: the original utility's flags and exact lines, as a real process over the real
API (FakeBridge behind it) on a real unix socket. The remote (-h HOST, -u/-p over TLS) case is in
test_auth."""

import os
import re
import subprocess
import sys
import time

import pytest

from tests.hostbridge.fakes import FakeBridge, ServedApp, api_config

OVM_VMMESSAGE = os.path.join(os.path.dirname(sys.executable), "ovm_vmmessage")
BANNER = "Oracle VM VM Message utility 0.5.2."


@pytest.fixture
def served(short_dir):
    bridge = FakeBridge(["ol6u3apitest", "down"])
    bridge.fake("ol6u3apitest").keys["newkey"] = ("newvalue", time.time() - 130, "guest")
    bridge.fake("down").set_connected(False)
    with ServedApp(bridge, api_config(short_dir)) as s:
        yield s


def ovm(served, *args, bridge=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMMESSAGE_")}
    env["VMMESSAGE_BRIDGE"] = bridge or served.unix_path
    return subprocess.run(
        [OVM_VMMESSAGE, *args], capture_output=True, text=True, timeout=60, env=env
    )


# The original's documented command line (-u/-p are accepted and unused on the local socket).
AS_DOCUMENTED = ["-u", "admin", "-p", "secret", "-h", "localhost", "-v", "ol6u3apitest"]


def test_it_should_print_the_original_lines_when_sending(served):
    r = ovm(served, *AS_DOCUMENTED, "-k", "foo", "-V", "bar")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        BANNER,
        "Connected.",
        "VM : 'ol6u3apitest' has status :  Running.",
        "Sending message.",
        "Message sent successfully.",
    ]
    assert served.bridge.fake("ol6u3apitest").keys["foo"][0] == "bar"


def test_it_should_print_the_original_lines_when_querying(served):
    r = ovm(served, *AS_DOCUMENTED, "-q", "newkey")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        BANNER,
        "Connected.",
        "VM : 'ol6u3apitest' has status :  Running.",
        "Querying for key 'newkey'.",
        "Query successful.",
        "Query for Key : 'newkey' returned value 'newvalue'.",
        "Key set 2 minutes ago.",
    ]


def test_it_should_use_the_local_socket_when_the_host_is_empty_or_omitted(served):
    for host_args in (["-h", ""], []):
        r = ovm(served, *host_args, "-v", "ol6u3apitest", "-q", "newkey")
        assert r.returncode == 0, r.stderr


def test_it_should_say_queued_and_unknown_for_a_vm_whose_agent_is_away_without_libvirt(served):
    r = ovm(served, "-h", "localhost", "-v", "down", "-k", "foo", "-V", "bar")
    assert r.returncode == 0
    assert r.stdout.splitlines()[2:] == [
        "VM : 'down' has status :  Unknown.",
        "Sending message.",
        "Message queued: the agent in VM 'down' is not connected; it will be delivered when it "
        "connects.",
    ]


def test_it_should_say_stopped_and_queued_until_the_next_boot_for_a_shut_off_vm(served):
    served.bridge.fake("down").info.run_state = "shutoff"
    r = ovm(served, "-h", "localhost", "-v", "down", "-k", "foo", "-V", "bar")
    assert r.returncode == 0
    assert r.stdout.splitlines()[2:] == [
        "VM : 'down' has status :  Stopped.",
        "Sending message.",
        "Message queued: VM 'down' is shut off; it will be delivered at its next boot.",
    ]


def test_it_should_say_the_managers_word_for_a_paused_vm_whose_agent_still_answers(served):
    served.bridge.fake("ol6u3apitest").info.run_state = "paused"
    r = ovm(served, "-v", "ol6u3apitest", "-q", "newkey")
    assert r.returncode == 0
    assert r.stdout.splitlines()[2] == "VM : 'ol6u3apitest' has status :  Suspended."


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["-v", "ghost", "-q", "k"], 1, "no VM named 'ghost'"),
        (["-v", "ol6u3apitest", "-q", "missing"], 1, "not set"),
        (["-v", "ol6u3apitest", "-k", "foo"], 2, "-k and -V go together"),
        (["-v", "ol6u3apitest"], 2, "give -k KEY -V VALUE"),
        (["-q", "k"], 2, "-v"),
        (["-v", "ol6u3apitest", "-k", "x" * 300, "-V", "v"], 2, "the limit is 256 bytes"),
        (["-v", "x", "--bogus"], 2, "unrecognized"),
    ],
)
def test_it_should_fail_with_one_line_and_the_documented_status(served, args, code, fragment):
    r = ovm(served, *args)
    assert r.returncode == code
    assert fragment in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "age,line",
    [
        (5, "Key set 0 minutes ago."),
        (75, "Key set 1 minutes ago."),
        (600, "Key set 10 minutes ago."),
        (3 * 3600 + 40, "Key set 180 minutes ago."),
    ],
)
def test_it_should_print_whole_minutes_as_the_original_did(served, age, line):
    # The bridge's answer carries the key's set time; the line counts from the CLI's clock.
    served.call(
        lambda: served.bridge.fake("ol6u3apitest").keys.__setitem__(
            "aged", ("v", time.time() - age, "guest")
        )
    )
    r = ovm(served, "-v", "ol6u3apitest", "-q", "aged")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == line


@pytest.mark.parametrize(
    "args",
    [["-v", "ol6u3apitest"], ["-q", "k"], ["-v", "x", "--bogus"], ["-v"], ["-v", "x", "-k", "k"]],
)
def test_a_usage_error_should_be_one_line_and_exit_2(served, args):
    r = ovm(served, *args)
    assert (r.returncode, r.stdout) == (2, "")
    assert re.fullmatch(r"ovm_vmmessage: error: [^\n]+ \(see ovm_vmmessage --help\)\n", r.stderr)


def test_it_should_exit_3_when_the_bridge_is_unreachable(served):
    r = ovm(served, "-v", "ol6u3apitest", "-q", "k", bridge="/nonexistent/api.sock")
    assert r.returncode == 3
    assert r.stdout == BANNER + "\n"
    assert "cannot connect to the bridge" in r.stderr


def test_it_should_escape_a_hostile_value(served):
    served.call(
        lambda: served.bridge.fake("ol6u3apitest").keys.__setitem__(
            "evil", ("a\x1b[31mb\nc", 0.0, "guest")
        )
    )
    r = ovm(served, "-v", "ol6u3apitest", "-q", "evil")
    assert "Query for Key : 'evil' returned value 'a\\x1b[31mb\\nc'." in r.stdout
    assert "\x1b" not in r.stdout


def test_it_should_document_its_flags_in_help():
    r = subprocess.run([OVM_VMMESSAGE, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("-u", "-p", "-h", "-v", "-k", "-V", "-q", "Exit status"):
        assert flag in r.stdout


def test_it_should_send_with_the_id_given_or_a_random_one_and_refuse_a_bad_one(served):
    assert ovm(served, *AS_DOCUMENTED, "-k", "foo", "-V", "bar").returncode == 0
    assert ovm(served, *AS_DOCUMENTED, "-k", "foo", "-V", "bar", "--id", "op-7").returncode == 0
    generated, given = served.bridge.idempotency_keys
    assert re.fullmatch("[0-9a-f]{32}", generated) and given == "op-7"
    r = ovm(served, *AS_DOCUMENTED, "-k", "foo", "-V", "bar", "--id", "no spaces")
    assert r.returncode == 2 and "--id: an idempotency key holds only" in r.stderr
    assert len(served.bridge.idempotency_keys) == 2
