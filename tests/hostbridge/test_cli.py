"""`vmmessage` as real processes against the real API (FakeBridge behind it) on a real unix socket;
the fast path against the click path; exit statuses; one-line usage errors; escaping of untrusted
guest strings; newtoken and adduser writing through hostbridge.auth."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from hostbridge import cli, render
from hostbridge.cli import commands
from hostbridge.errors import AgentTimeout
from tests.hostbridge.fakes import FakeBridge, ServedApp, api_config

VMMESSAGE = os.path.join(os.path.dirname(sys.executable), "vmmessage")
HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\r\nfake prompt# \u202eevil\x9b31m"


@pytest.fixture
def served(short_dir):
    bridge = FakeBridge(["vm1", "vm2"])
    vm1 = bridge.fake("vm1")
    vm1.keys["newkey"] = ("newvalue", time.time() - 150, "guest")
    vm1.keys["hostile"] = (HOSTILE, time.time(), "guest")
    bridge.fake("vm2").keys["old"] = ("mirrored", time.time() - 600, "guest")
    bridge.fake("vm2").set_connected(False)
    bridge.fake("vm2").info.last_seen = time.time() - 300
    with ServedApp(bridge, api_config(short_dir)) as s:
        yield s


def vmm(served, *args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("VMMESSAGE_")}
    e["VMMESSAGE_BRIDGE"] = served.unix_path if served else "/nonexistent/api.sock"
    e.update(env or {})
    return subprocess.run([VMMESSAGE, *args], capture_output=True, text=True, timeout=60, env=e)


def test_it_should_print_the_original_query_lines(served):
    r = vmm(served, "query", "vm1", "newkey")
    assert r.returncode == 0
    assert (
        r.stdout == "Query for Key : 'newkey' returned value 'newvalue'.\nKey set 2 minutes ago.\n"
    )
    assert r.stderr == ""


def test_it_should_add_the_stale_marker_when_the_answer_came_from_the_mirror(served):
    r = vmm(served, "query", "vm2", "old")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "Query for Key : 'old' returned value 'mirrored'.",
        "Key set 10 minutes ago.",
        "(stale: the agent was last seen 5 minutes ago)",
    ]


def test_it_should_say_sent_or_queued(served):
    r = vmm(served, "send", "vm1", "foo", "bar")
    assert (r.returncode, r.stdout) == (0, "Message sent successfully.\n")
    r = vmm(served, "send", "vm2", "foo", "bar")
    assert (r.returncode, r.stdout) == (
        0,
        "Message queued: the agent in VM 'vm2' is not connected; it will be "
        "delivered when it connects.\n",
    )


@pytest.mark.parametrize(
    "given,seconds", [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("7d", 604800.0)]
)
def test_send_should_pass_its_expiry_in_seconds(served, given, seconds):
    r = vmm(served, "send", "vm2", "k", "v", "--expires", given)
    assert r.returncode == 0 and "Message queued" in r.stdout
    assert served.bridge.expires == seconds


def test_send_should_pass_an_expiry_of_never_as_0_and_none_when_not_given(served):
    assert vmm(served, "send", "vm2", "k", "v", "--expires", "never").returncode == 0
    assert served.bridge.expires == 0.0
    assert vmm(served, "send", "vm2", "k", "v", "--no-log").returncode == 0
    assert served.bridge.expires is None


def test_cancel_should_say_what_it_cancelled(served):
    for i in range(3):
        vmm(served, "send", "vm2", "k%d" % i, "v")
    r = vmm(served, "cancel", "vm2", "2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "Message 2 to VM 'vm2' cancelled.\n", "")
    r = vmm(served, "cancel", "vm2", "--all")
    assert (r.returncode, r.stdout) == (0, "2 messages to VM 'vm2' cancelled: 1, 3.\n")
    r = vmm(served, "cancel", "vm2", "--all")
    assert (r.returncode, r.stdout) == (0, "No message to VM 'vm2' is waiting for delivery.\n")
    r = vmm(served, "cancel", "vm2", "2")
    assert r.returncode == 1 and "no message 2 waiting for delivery" in r.stderr
    assert "Queued messages: 0" in vmm(served, "status", "vm2").stdout.splitlines()


def test_queue_should_list_waiting_messages_with_their_seq_and_never_a_value():
    doc = {
        "vm": "web2",
        "messages": [
            {
                "seq": 4,
                "key": "pw",
                "op": "set",
                "size": 12,
                "log": False,
                "created": 1000.0,
                "expires": None,
                "in_flight": True,
            },
            {
                "seq": 9,
                "key": "k\x1b",
                "op": "del",
                "size": 0,
                "log": True,
                "created": 1290.0,
                "expires": 7200.0,
                "in_flight": False,
            },
        ],
    }
    assert render.queue_lines(doc, 1300.0) == [
        "SEQ  QUEUED          EXPIRES                  SIZE      KEY",
        "4    5 minutes ago   never                    12 bytes  pw (in flight)",
        "9    10 seconds ago  1970-01-01 02:00:00 UTC  0 bytes   k\\x1b (delete)",
    ]
    assert render.queue_lines({"vm": "web2", "messages": []}, 0.0) == [
        "No message to VM 'web2' is waiting for delivery."
    ]


def test_cancel_should_say_when_a_message_was_already_written_to_the_agent():
    lines = render.cancel_lines({"vm": "web\x1b1", "cancelled": [], "in_flight": [4]}, 0.0)
    assert lines == [
        "Message 4 to VM 'web\\x1b1' was already written to the agent: its value is erased "
        "from the bridge and it will not be sent again; the audit will say whether it arrived."
    ]


def test_it_should_pass_no_log_no_queue_and_timeout(served):
    r = vmm(served, "send", "vm1", "k", "v", "--no-log", "--timeout", "2.5")
    assert r.returncode == 0
    assert served.bridge.calls[-1] == ("send", "vm1", "k", False, True, 2.5)
    r = vmm(served, "send", "--no-queue", "vm2", "k", "v")
    assert r.returncode == 5
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "not connected" in r.stderr


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["query", "vm1", "missing"], 1, "not set"),
        (["query", "nope", "k"], 1, "no VM named 'nope'"),
        (["status", "nope"], 1, "no VM named"),
        (["send", "vm1", "k" * 300, "v"], 2, "the limit is 256 bytes"),
        (["send", "vm1", "k", "v" * 8200], 2, "the limit is 8192 bytes"),
        (["send", "vm1", "a=b", "v"], 2, "'='"),
        (["send", "vm1", "k"], 2, "Missing argument"),
        (["frobnicate"], 2, "No such command"),
        (["send", "vm1", "k", "v", "--timeout", "0"], 2, "timeout"),
        (["send", "vm1", "k", "v", "--timeout", "5e-324"], 2, "0.1<=x<=300"),
        (["query", "vm1", "k", "--timeout", "0.001"], 2, "0.1<=x<=300"),
    ],
)
def test_it_should_exit_with_the_documented_status_and_one_line_errors(
    served, args, code, fragment
):
    r = vmm(served, *args)
    assert r.returncode == code
    assert fragment in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmmessage: error: ")
    assert r.stdout == ""


@pytest.mark.parametrize(
    "args,reason,command",
    [
        ([], "no command given", "vmmessage"),
        (["frobnicate"], "No such command 'frobnicate'", "vmmessage"),
        (["--json"], "Missing command", "vmmessage"),
        (["send", "vm1", "k"], "Missing argument 'VALUE'", "vmmessage send"),
        (["query"], "Missing argument 'VM'", "vmmessage query"),
        (["query", "vm1", "k", "--bogus"], "No such option '--bogus'", "vmmessage query"),
        (["--colour", "list"], "No such option '--colour'", "vmmessage"),
        (["status", "vm1", "extra"], "Got unexpected extra argument (extra)", "vmmessage status"),
        (["send", "vm1", "k", "v", "--timeout", "0"], "Invalid value for '--timeout'", None),
        (["send", "vm1", "k", "v", "--timeout", "soon"], "Invalid value for '--timeout'", None),
        (["audit", "vm1", "--limit", "0"], "Invalid value for '--limit'", "vmmessage audit"),
        # click does not say which command's parser this came from: the top help it is.
        (["list", "--bridge"], "Option '--bridge' requires an argument", "vmmessage"),
        (["newtoken", "ci"], "Missing option '--tokens-file'", "vmmessage newtoken"),
        (["cancel", "vm2"], "give either a message number SEQ or --all", "vmmessage cancel"),
        (["cancel", "vm2", "3", "--all"], "give either a message number SEQ or --all", None),
        (["cancel", "vm2", "0"], "Invalid value for '[SEQ]'", None),
        (["send", "vm1", "k", "v", "--expires", "soon"], "Invalid value for '--expires'", None),
        (["send", "vm1", "k", "v", "--expires", "-5m"], "Invalid value for '--expires'", None),
    ],
)
def test_a_usage_error_should_be_one_line_on_stderr_and_exit_2(served, args, reason, command):
    r = vmm(served, *args)
    assert (r.returncode, r.stdout) == (2, "")
    command = command or "vmmessage " + args[0]
    assert re.fullmatch(
        r"vmmessage: error: %s[^\n]* \(see %s --help\)\n" % (re.escape(reason), command), r.stderr
    ), r.stderr
    assert served.bridge.calls == []  # nothing reached the bridge


def test_a_usage_error_should_show_a_hostile_argument_escaped_on_its_one_line(served):
    r = vmm(served, "status", "vm1", "ex\x1b[2J\ntra")
    assert r.returncode == 2
    assert r.stderr == (
        "vmmessage: error: Got unexpected extra argument (ex\\x1b[2J tra) "
        "(see vmmessage status --help)\n"
    )


def test_it_should_exit_3_when_the_bridge_is_unreachable():
    for args in (["query", "vm1", "k"], ["list"], ["send", "vm1", "k", "v"], ["status", "vm1"]):
        r = vmm(None, *args)
        assert r.returncode == 3
        assert (
            r.stderr == "vmmessage: error: cannot connect to the bridge at /nonexistent/api.sock: "
            "No such file or directory\n"
        )


def test_it_should_exit_4_on_agent_timeout(served):
    served.call(
        lambda: served.bridge.fail_with.__setitem__(
            "query", AgentTimeout("the agent did not answer")
        )
    )
    r = vmm(served, "query", "vm1", "newkey")
    assert (r.returncode, r.stderr) == (4, "vmmessage: error: the agent did not answer\n")


def test_it_should_escape_control_characters_and_escape_sequences_from_the_guest(served):
    for args in (
        ["query", "vm1", "hostile"],
        ["keys", "vm1"],
        ["query", "--json", "vm1", "hostile"],
    ):
        r = subprocess.run(
            [VMMESSAGE, *args],
            capture_output=True,
            timeout=60,
            env=dict(os.environ, VMMESSAGE_BRIDGE=served.unix_path),
        )
        assert r.returncode == 0
        out = r.stdout.decode("utf-8")
        for bad in ("\x1b", "\x07", "\r", "\u202e", "\x9b"):
            assert bad not in out, (args, bad)
        if "--json" in args:
            assert json.loads(out)["value"] == HOSTILE
        else:
            assert "\\x1b]0;pwned\\x07\\x1b[2J\\r\\nfake prompt# \\u202eevil\\x9b31m" in out


@pytest.mark.parametrize("args", [["query", "vm1", "newkey"], ["list"], ["--help"]])
def test_it_should_end_quietly_with_141_when_nobody_reads_its_output(served, args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `vmmessage list | head -0` leaves it
    try:
        r = subprocess.run(
            [VMMESSAGE, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=dict(os.environ, VMMESSAGE_BRIDGE=served.unix_path),
        )
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def test_it_should_list_vms_with_state_last_seen_queued_and_channel(served):
    r = vmm(served, "list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "AGENT", "LAST", "SEEN", "QUEUED", "CHANNEL"]
    assert lines[1].split() == ["vm1", "unknown", "connected", "now", "0", "pty:/tmp/fake-vm1"]
    assert lines[2].split() == [
        "vm2",
        "unknown",
        "disconnected",
        "5",
        "minutes",
        "ago",
        "0",
        "pty:/tmp/fake-vm2",
    ]


def test_it_should_show_status_keys_rm_and_audit(served):
    r = vmm(served, "status", "vm2")
    assert r.returncode == 0
    assert (
        "VM : 'vm2'" in r.stdout
        and "Agent: disconnected" in r.stdout
        and "Queued messages: 0" in r.stdout
    )
    r = vmm(served, "keys", "vm2")
    assert r.stdout.splitlines() == [
        "old = 'mirrored'  (set 10 minutes ago by the guest)",
        "(stale: the agent was last seen 5 minutes ago)",
    ]
    assert vmm(served, "send", "vm1", "gone", "soon").returncode == 0
    r = vmm(served, "rm", "vm1", "gone")
    assert (r.returncode, r.stdout) == (0, "Key 'gone' deleted.\n")
    assert vmm(served, "query", "vm1", "gone").returncode == 1
    r = vmm(served, "rm", "vm2", "old")
    assert r.stdout.startswith("Deletion queued: the agent in VM 'vm2' is not connected")
    vmm(served, "send", "--no-log", "vm1", "pw", "hunter2")
    r = vmm(served, "audit", "vm1")
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    assert (
        "delivered" in first
        and " pw " in first
        and "(not logged)" in first
        and "hunter2" not in r.stdout
    )


def test_it_should_print_json_for_each_command(served):
    for args in (
        ["list"],
        ["status", "vm1"],
        ["keys", "vm1"],
        ["query", "vm1", "newkey"],
        ["audit", "vm1"],
        ["send", "vm1", "j", "son"],
        ["rm", "vm1", "j"],
    ):
        for where in ("before", "after"):
            argv = ["--json", *args] if where == "before" else [*args, "--json"]
            if args[0] == "rm":
                vmm(served, "send", "vm1", "j", "son")
            r = vmm(served, *argv)
            assert r.returncode == 0, (argv, r.stderr)
            assert isinstance(json.loads(r.stdout), dict)


def test_it_should_accept_the_manager_cli_form(served):
    r = vmm(served, "sendVmMessage", "Vm", "name=vm1", "key=foo", "message=bar", "log=no")
    lines = r.stdout.splitlines()
    assert r.returncode == 0
    assert lines[0] == "Command: sendVmMessage Vm name=vm1 key=foo message=bar log=no"
    assert lines[1] == "Status: Success"
    assert re.fullmatch(r"Time: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} UTC", lines[2])
    assert served.bridge.calls[-1][:4] == ("send", "vm1", "foo", False)
    r = vmm(served, "sendVmMessage", "Vm", "name=ghost", "key=foo", "message=bar")
    assert r.returncode == 1
    assert r.stdout.splitlines()[1] == "Status: Failure"
    assert r.stdout.splitlines()[3] == "Error Msg: no VM named 'ghost'"
    r = vmm(served, "sendVmMessage", "Vm", "name=vm1", "key=foo")
    assert r.returncode == 2 and "Error Msg: message= is required" in r.stdout


def test_it_should_document_the_exit_statuses_in_help():
    r = subprocess.run([VMMESSAGE, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for line in (
        "0  success",
        "1  not found",
        "2  usage",
        "3  the bridge is unreachable",
        "4  the agent did not",
        "5  the agent is not connected",
        "6  unauthorized",
        "7  the agent refused the message (e.g. its key quota is full)",
    ):
        assert line in r.stdout
    assert (
        "Exit status"
        in subprocess.run([VMMESSAGE, "send", "--help"], capture_output=True, text=True).stdout
    )


def test_it_should_add_a_user_and_a_token(tmp_path):
    from hostbridge import auth

    users = tmp_path / "users"
    r = subprocess.run(
        [VMMESSAGE, "adduser", "admin", "--users-file", str(users), "--password-stdin"],
        input="pw-1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (0, "User 'admin' added.\n")
    assert auth.verify_password("pw-1", users.read_text().split(":", 1)[1].strip())


def newtoken(*args):
    return subprocess.run(
        [VMMESSAGE, "newtoken", *args], capture_output=True, text=True, timeout=60
    )


def test_newtoken_should_append_a_token_to_a_0600_file_and_print_it_once(tmp_path):
    from hostbridge import auth

    tokens = tmp_path / "tokens"
    r = newtoken("ci", "--tokens-file", str(tokens))
    assert r.returncode == 0 and r.stderr == ""
    first = r.stdout.strip()
    assert r.stdout == first + "\n" and len(first) >= 32
    assert tokens.read_text() == "ci:%s\n" % first
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600

    tokens.write_text(tokens.read_text() + "# revoked:old\n")
    tokens.chmod(0o644)
    r = newtoken("deploy", "--tokens-file", str(tokens))
    second = r.stdout.strip()
    assert r.returncode == 0 and second != first
    assert tokens.read_text() == "ci:%s\n# revoked:old\ndeploy:%s\n" % (first, second)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert tokens.read_text().count(second) == 1
    assert auth._parse_tokens(tokens.read_text().splitlines(), str(tokens)) == [
        ("ci", first.encode()),
        ("deploy", second.encode()),
    ]


@pytest.mark.parametrize("name", ["a:b", "with space", "#hidden", ""])
def test_newtoken_should_refuse_a_bad_name_and_write_nothing(tmp_path, name):
    tokens = tmp_path / "tokens"
    r = newtoken(name, "--tokens-file", str(tokens))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("vmmessage: error: Invalid value for 'NAME': a token name must")
    assert r.stderr.endswith("(see vmmessage newtoken --help)\n") and r.stderr.count("\n") == 1
    assert not tokens.exists()


def test_newtoken_should_say_in_one_line_when_it_cannot_write_the_file(tmp_path):
    r = newtoken("ci", "--tokens-file", str(tmp_path / "missing-dir" / "tokens"))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "vmmessage: error: cannot write %s: No such file or directory\n" % (
        tmp_path / "missing-dir" / "tokens"
    )


# ---- the fast path ----

CASES = [
    ["query", "vm1", "newkey"],
    ["query", "vm2", "old"],
    ["query", "vm1", "missing"],
    ["query", "nope", "k"],
    ["query", "vm1", "hostile"],
    ["send", "vm1", "fk", "fv"],
    ["send", "vm2", "fk", "fv"],
    ["send", "vm1", "k" * 300, "v"],
    ["query", "vm1", "a=b"],
]


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(x[:12] for x in a))
def test_it_should_print_the_same_through_the_fast_path_and_click(
    served, argv, capsys, monkeypatch
):
    monkeypatch.setenv("VMMESSAGE_BRIDGE", served.unix_path)
    fast_status = cli.fast_path(argv)
    assert fast_status is not None  # the shape is the fast one
    fast = capsys.readouterr()
    click_status = commands.click_main(argv)
    slow = capsys.readouterr()
    assert (fast_status, fast.out, fast.err) == (click_status, slow.out, slow.err)


def test_it_should_exit_identically_through_both_paths_when_unreachable(capsys, monkeypatch):
    monkeypatch.setenv("VMMESSAGE_BRIDGE", "/nonexistent/api.sock")
    argv = ["query", "vm1", "k"]
    fast = (cli.fast_path(argv), capsys.readouterr())
    slow = (commands.click_main(argv), capsys.readouterr())
    assert fast == slow and fast[0] == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "vm1"],
        ["query", "--json", "vm1", "k"],
        ["query", "vm1", "-k"],
        ["list"],
        ["send", "vm1", "k", "-v"],
    ],
)
def test_it_should_leave_every_other_shape_to_click(argv):
    assert cli.fast_path(argv) is None


def imported_modules(served, *args):
    env = dict(os.environ, VMMESSAGE_BRIDGE=served.unix_path)
    r = subprocess.run(
        [sys.executable, "-X", "importtime", VMMESSAGE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    mods = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return r, mods


@pytest.mark.parametrize("args", [["query", "vm1", "newkey"], ["send", "vm1", "k", "v"]])
def test_it_should_not_import_click_aiohttp_asyncio_or_socket_on_the_fast_path(served, args):
    r, mods = imported_modules(served, *args)
    assert r.returncode == 0, r.stderr[-500:]
    assert "hostbridge.cli" in mods and "_socket" in mods  # the measurement is real
    assert not mods & {
        "click",
        "aiohttp",
        "asyncio",
        "socket",
        "ssl",
        "http.client",
        "orjson",
        "json",
    }


def test_it_should_import_click_on_the_other_paths(served):
    r, mods = imported_modules(served, "list")
    assert r.returncode == 0
    assert "click" in mods and "aiohttp" not in mods


def test_every_send_should_carry_an_idempotency_key_random_or_given_with_id(served):
    for args in (
        ["send", "vm1", "k", "v"],  # the fast path
        ["send", "vm1", "k", "v", "--json"],  # click
        ["send", "vm1", "k", "v", "--id", "run-42:step.3"],
        ["sendVmMessage", "Vm", "name=vm1", "key=k", "message=v", "id=run-42:step.4"],
    ):
        assert vmm(served, *args).returncode == 0
    random_fast, random_click, *given = served.bridge.idempotency_keys
    assert re.fullmatch("[0-9a-f]{32}", random_fast) and re.fullmatch("[0-9a-f]{32}", random_click)
    assert random_fast != random_click
    assert given == ["run-42:step.3", "run-42:step.4"]


def test_a_send_with_the_id_of_an_earlier_one_should_print_that_ones_outcome(served):
    first = vmm(served, "send", "vm2", "k", "v", "--id", "once", "--json")
    again = vmm(served, "send", "vm2", "k", "v", "--id", "once", "--json")
    assert (json.loads(first.stdout)["replayed"], json.loads(again.stdout)["replayed"]) == (
        False,
        True,
    )
    assert json.loads(first.stdout)["seq"] == json.loads(again.stdout)["seq"]
    assert served.bridge.fake("vm2").info.queued == 1


@pytest.mark.parametrize(
    "args",
    [
        ["send", "vm1", "k", "v", "--id", "has space"],
        ["send", "vm1", "k", "v", "--id", "x" * 129],
        ["send", "vm1", "k", "v", "--id", ""],
        ["sendVmMessage", "Vm", "name=vm1", "key=k", "message=v", "id=a;b"],
    ],
)
def test_a_bad_id_should_be_a_usage_error_and_send_nothing(served, args):
    r = vmm(served, *args)
    assert r.returncode == 2
    assert "idempotency key" in r.stderr + r.stdout
    assert served.bridge.calls == []
