"""The ovmd command against the real daemon: a real subprocess for every call, the daemon on a raw
pty with a host peer on the master (tests/guestagent/harness.py), the real unix socket.

Covers the original tool's session byte for byte, the fast path and the click path giving the same
bytes and exit codes, every exit code with its one-line message, and the additions.
"""

import calendar
import json
import os
import pwd
import re
import subprocess
import time

import pytest

from guestagent import cli
from ovmproto.messages import Ok, Set
from tests.guestagent.harness import Daemon, Host
from tests.support.agent import OVMD
from tests.support.waiting import TIMEOUT, wait_for

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def ovmd(*args, socket=None, timeout=60, stdout=subprocess.PIPE):
    """Run the installed ovmd command; the CompletedProcess (stdout/stderr as bytes)."""
    env = dict(os.environ)
    env.pop("OVMD_SOCKET", None)
    if socket is not None:
        env["OVMD_SOCKET"] = socket
    return subprocess.run(
        [OVMD] + list(args), stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=timeout
    )


def outcome(result):
    return result.returncode, result.stdout, result.stderr


class OvmdDaemon(Daemon):
    """The harness's daemon, started the way systemd starts it: ``ovmd --daemon``."""

    def command(self):
        return [OVMD, "--daemon", *self.options(), *self.args]


class Agent:
    """A running daemon with a synced host, and shortcuts for the tests."""

    def __init__(self, host, daemon):
        self.host = host
        self.daemon = daemon
        self.socket = daemon.socket
        self.seq = 0

    def run(self, *args, **kw):
        return ovmd(*args, socket=self.socket, **kw)

    def ok(self, *args):
        """Run ovmd, expect success and silence on stderr; return stdout."""
        result = self.run(*args)
        assert (result.returncode, result.stderr) == (0, b""), outcome(result)
        return result.stdout

    def host_set(self, key, value):
        self.seq += 1
        reply = self.host.request(Set, key=key, value=value, seq=self.seq)
        assert type(reply) is Ok, reply
        return reply

    def listing(self):
        return self.ok("-l")

    def host_sees(self, match):
        """Read the channel until the host saw a `changed` for which match() is true; return the
        number of `changed` seen up to and including it."""

        def seen():
            for i, change in enumerate(self.host.changed):
                if match(change):
                    return i + 1
            self.host.poll(0.2)
            return None

        return wait_for(seen, what="the host to see the change")

    def drain(self):
        """Read whatever the daemon announced so far (the pty must not fill up)."""
        while self.host.poll(0):
            pass
        del self.host.changed[:]


@pytest.fixture(scope="module")
def running():
    with Host() as host, OvmdDaemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()
        yield Agent(host, daemon)


@pytest.fixture
def agent(running):
    """The module's agent with an empty cache."""
    running.ok("-x")
    assert running.listing() == b""
    running.drain()
    return running


# -- the original tool's interface -----------------------------------------------------------------


def test_it_should_replay_the_documented_session_byte_for_byte(agent):
    agent.host_set("foo", "bar")
    assert agent.ok("-p", "mykey=myvalue") == b""
    assert agent.ok("-l") == b'{"foo":"bar"}\n{"mykey":"myvalue"}\n'
    assert agent.ok("-g", "mykey") == b"myvalue\n"
    assert agent.ok("-r", "mykey") == b""
    assert agent.ok("-l") == b'{"foo":"bar"}\n'
    assert agent.ok("-p", "newkey=newvalue") == b""
    assert agent.ok("-l") == b'{"foo":"bar"}\n{"newkey":"newvalue"}\n'


def test_it_should_list_in_set_order_with_a_reset_key_moving_last(agent):
    agent.ok("-p", "a=1", "-p", "b=2")
    agent.ok("-p", "a=3")
    assert agent.ok("-l") == b'{"b":"2"}\n{"a":"3"}\n'


def test_it_should_split_a_pair_at_the_first_equals_sign(agent):
    agent.ok("-p", "url=http://h/?a=b&c=d")
    assert agent.ok("-g", "url") == b"http://h/?a=b&c=d\n"


def test_it_should_keep_unicode_keys_and_values_as_utf8(agent):
    agent.ok("-p", "ключ=значение ✓ 😀")
    agent.host_set("ホスト", "värde\tmed tab")
    assert agent.ok("-g", "ключ") == "значение ✓ 😀\n".encode()
    assert agent.ok("-g", "ホスト") == "värde\tmed tab\n".encode()
    listing = '{"ключ":"значение ✓ 😀"}\n{"ホスト":"värde\\tmed tab"}\n'
    assert agent.ok("-l") == listing.encode("utf-8")


def test_it_should_print_a_multiline_value_bare_with_g_and_escaped_with_l(agent):
    agent.host_set("motd", "line 1\nline 2")
    assert agent.ok("-g", "motd") == b"line 1\nline 2\n"
    assert agent.ok("-l") == b'{"motd":"line 1\\nline 2"}\n'


def test_it_should_accept_a_key_and_a_value_exactly_at_their_limits(agent):
    key, value = "k" * 256, "v" * 8192
    agent.ok("-p", key + "=" + value)
    assert agent.ok("-g", key) == value.encode() + b"\n"
    wide_key, wide_value = "é" * 128, "€" * 2730 + "xx"  # 256 and 8192 bytes of UTF-8
    agent.ok("-p", wide_key + "=" + wide_value)
    assert agent.ok("-g", wide_key) == (wide_value + "\n").encode("utf-8")


def test_it_should_delete_every_pair_with_x_and_tell_the_host(agent):
    agent.ok("-p", "a=1", "-p", "b=2")
    # Read up to the announcement of b, so that the next one is whatever -x causes.
    seen = agent.host_sees(lambda c: c.op == "set" and c.key == "b")
    assert agent.ok("-x") == b""
    assert agent.listing() == b""
    changes = agent.host.wait_changed(seen + 1)
    assert (changes[seen].op, changes[seen].origin) == ("clear", "guest")


def test_it_should_succeed_quietly_when_deleting_a_missing_key(agent):
    assert outcome(agent.run("-r", "never-set")) == (0, b"", b"")


def test_it_should_print_its_version():
    assert outcome(ovmd("-v")) == (0, b"ovmd 0.1.0\n", b"")


# -- both parsers, same bytes ----------------------------------------------------------------------

QUERIES = [
    (["-g", "foo"], ["--get-param", "foo"]),
    (["-g", "foo"], ["--get-param=foo"]),
    (["-g", "missing"], ["--get-param", "missing"]),
    (["-g", "a=b"], ["--get-param=a=b"]),
    (["-g", "k" * 257], ["--get-param", "k" * 257]),
    (["-l"], ["--list-params"]),
    (["-r", "a=b"], ["--delete-param", "a=b"]),
    (["-p", "novalue"], ["--set-param", "novalue"]),
    (["-p", "k=" + "v" * 8193], ["--set-param=k=" + "v" * 8193]),
]


@pytest.mark.parametrize("fast, slow", QUERIES, ids=lambda a: " ".join(a)[:40])
def test_it_should_answer_the_same_through_both_parsers(agent, fast, slow):
    agent.host_set("foo", "bär")
    agent.ok("-p", "x=1")
    assert cli.fast_plan(fast) is not None and cli.fast_plan(slow) is None
    assert outcome(agent.run(*fast)) == outcome(agent.run(*slow))


CHANGES = [
    (["-p", "a=1"], ["--set-param", "a=1"]),
    (["-p", "a=1", "-p", "b=x=y"], ["--set-param=a=1", "--set-param", "b=x=y"]),
    (["-p", "a=1", "-p", "b"], ["--set-param=a=1", "--set-param", "b"]),
    (["-r", "foo"], ["--delete-param", "foo"]),
    (["-x"], ["--delete-params"]),
]


@pytest.mark.parametrize("fast, slow", CHANGES, ids=lambda a: " ".join(a)[:40])
def test_it_should_change_the_cache_the_same_through_both_parsers(agent, fast, slow):
    results = []
    for args in (fast, slow):
        agent.ok("-x")
        agent.ok("-p", "foo=bar", "-p", "keep=me")
        result = agent.run(*args)
        results.append((outcome(result), agent.listing()))
    assert results[0] == results[1]


def test_it_should_report_an_unreachable_daemon_the_same_through_both_parsers(tmp_path):
    path = str(tmp_path / "none.sock")
    fast = ovmd("--socket", path, "-g", "k")
    assert outcome(fast) == outcome(ovmd("--socket=" + path, "--get-param", "k"))
    assert outcome(fast) == outcome(ovmd("-g", "k", socket=path))


# -- exit codes and their one-line messages --------------------------------------------------------


def one_line(stderr):
    text = stderr.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-g", "missing"], 1, "ovmd: key not found: missing\n"),
        (["-g", "k" * 257], 2, "ovmd: key is 257 bytes, the limit is 256 bytes\n"),
        (["-p", "k" * 257 + "=v"], 2, "ovmd: key is 257 bytes, the limit is 256 bytes\n"),
        (["-p", "k=" + "v" * 8193], 2, "ovmd: value is 8193 bytes, the limit is 8192 bytes\n"),
        (["-g", "a=b"], 2, "ovmd: key contains '=', which is not allowed\n"),
        (
            ["-p", "k\x01ey=v"],
            2,
            "ovmd: key contains control character U+0001, which is not allowed\n",
        ),
        (
            ["-r", "tab\tkey"],
            2,
            "ovmd: key contains control character U+0009, which is not allowed\n",
        ),
        (["-p", "=v"], 2, "ovmd: key is empty\n"),
        (["-p", "s3cr3t"], 2, "ovmd: -p expects KEY=VALUE, and its argument has no '='\n"),
        (["-e", "e" * 8193], 2, "ovmd: value is 8193 bytes, the limit is 8192 bytes\n"),
        (["--frobnicate"], 2, "ovmd: No such option: --frobnicate\n"),
        (["-g"], 2, "ovmd: Option '-g' requires an argument.\n"),
        (["-l", "-x"], 2, "ovmd: -l and -x cannot be combined; give one action per call\n"),
        (["-w", "k", "--timeout", "-1"], 2, None),
        (["-d", "7", "-l"], 2, None),
    ],
)
def test_it_should_fail_with_the_documented_code_and_one_line(agent, args, code, message):
    result = agent.run(*args)
    assert (result.returncode, result.stdout) == (code, b"")
    text = one_line(result.stderr)
    assert text.startswith("ovmd: ")
    if message is not None:
        # click words some of its messages differently across versions; ours are exact
        if args[0].startswith("--fro"):
            assert text.startswith("ovmd: No such option") and "--frobnicate" in text
        else:
            assert text == message
    assert b"s3cr3t" not in result.stderr and b"vvvv" not in result.stderr
    assert agent.listing() == b""  # nothing was stored by a refused command


def test_it_should_fail_with_3_when_no_daemon_listens(tmp_path):
    missing = str(tmp_path / "missing.sock")
    result = ovmd("-g", "k", socket=missing)
    assert result.returncode == 3
    assert one_line(result.stderr) == (
        "ovmd: cannot reach the ovmd daemon at %s: No such file or directory\n" % missing
    )

    import socket as socket_module

    stale = str(tmp_path / "stale.sock")
    s = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    s.bind(stale)  # a socket file nobody listens on (a daemon that died)
    try:
        result = ovmd("-l", socket=stale)
    finally:
        s.close()
    assert result.returncode == 3
    assert one_line(result.stderr) == (
        "ovmd: cannot reach the ovmd daemon at %s: Connection refused\n" % stale
    )


def test_it_should_take_the_socket_from_the_config_file(agent, tmp_path):
    agent.ok("-p", "where=config")
    conf = tmp_path / "ovmd.conf"
    conf.write_text("[ovmd]\nsocket = %s\n" % agent.socket)
    result = ovmd("--config", str(conf), "-g", "where")
    assert outcome(result) == (0, b"config\n", b"")


def run_as_nobody(args):
    """Run cli.main(args) in a forked child that has become `nobody`: (rc, stdout, stderr).

    A fork, not a new interpreter: this machine's Python lives under /root, which nobody may not
    enter; the child already has everything the fast path imports.
    """
    nobody = pwd.getpwnam("nobody")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = cli.main(args)
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks = {out_r: b"", err_r: b""}
    for fd in (out_r, err_r):
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks[fd] += data
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), chunks[out_r], chunks[err_r]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")


@needs_root
def test_it_should_fail_with_3_when_the_socket_is_not_ours_to_use(agent):
    rc, out, err = run_as_nobody(["--socket", agent.socket, "-g", "k"])
    assert (rc, out) == (3, b"")
    assert one_line(err) == (
        "ovmd: cannot reach the ovmd daemon at %s: Permission denied\n" % agent.socket
    )


@needs_root
def test_it_should_fail_with_4_when_the_daemon_denies_the_user(running):
    # Open the way to the socket so that only the daemon's own SO_PEERCRED check stands.
    directory = os.path.dirname(running.socket)
    old_dir, old_sock = os.stat(directory).st_mode, os.stat(running.socket).st_mode
    os.chmod(directory, 0o755)
    os.chmod(running.socket, 0o666)
    try:
        rc, out, err = run_as_nobody(["--socket", running.socket, "-g", "k"])
    finally:
        os.chmod(directory, old_dir & 0o7777)
        os.chmod(running.socket, old_sock & 0o7777)
    assert (rc, out) == (4, b"")
    text = one_line(err)
    assert text.startswith("ovmd: ") and "uid %d" % pwd.getpwnam("nobody").pw_uid in text


def test_it_should_fail_with_4_when_the_cache_is_full_and_store_nothing(tmp_path):
    with Host() as host, OvmdDaemon(channel=host.link, args=["--max-keys", "2"]) as daemon:
        daemon.wait_ready()
        sock = daemon.socket
        assert ovmd("-p", "a=1", socket=sock).returncode == 0
        result = ovmd("-p", "b=2", "-p", "c=3", socket=sock)
        assert (result.returncode, result.stdout) == (4, b"")
        assert re.match(r"^ovmd: .*the limit is 2 keys\n$", one_line(result.stderr))
        # all or none: b was valid and fitted, but it was not stored either
        assert outcome(ovmd("-l", socket=sock)) == (0, b'{"a":"1"}\n', b"")
        # re-setting an existing key still works with the cache full
        assert ovmd("-p", "b=2", socket=sock).returncode == 0
        assert ovmd("-p", "a=9", socket=sock).returncode == 0
        assert outcome(ovmd("-g", "a", socket=sock)) == (0, b"9\n", b"")


def test_it_should_refuse_all_pairs_when_one_is_invalid(agent):
    result = agent.run("-p", "a=1", "-p", "b=" + "x" * 8193, "-p", "c=3")
    assert result.returncode == 2
    assert agent.listing() == b""


def test_it_should_end_quietly_when_its_reader_goes_away(agent):
    agent.ok(*[a for i in range(20) for a in ("-p", "k%d=%s" % (i, "v" * 100))])
    for args in (["-l"], ["--list-params"], ["-g", "k1"]):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before ovmd writes
        try:
            result = agent.run(*args, stdout=w)
        finally:
            os.close(w)
        assert (result.returncode, result.stderr) == (141, b""), args


def test_it_should_fail_with_5_when_the_output_cannot_be_written(agent):
    agent.ok("-p", "k=v")
    with open("/dev/full", "wb") as full:
        result = agent.run("-g", "k", stdout=full)
    assert result.returncode == 5
    assert one_line(result.stderr) == "ovmd: cannot write the output: No space left on device\n"


def test_it_should_refuse_a_bad_config_file_for_the_daemon_in_one_line(tmp_path):
    conf = tmp_path / "ovmd.conf"
    conf.write_text("[ovmd]\nmax_keys = many\n")
    result = ovmd("--daemon", "--config", str(conf), "--socket", str(tmp_path / "s"))
    assert result.returncode == 2
    text = one_line(result.stderr)
    assert text.startswith("ovmd: %s line 2: max_keys " % conf), text


# -- the additions ---------------------------------------------------------------------------------


def test_it_should_print_entries_with_time_and_origin_as_json(agent):
    before = time.time()
    agent.host_set("from-host", "h")
    agent.ok("-p", "from-guest=g")
    after = time.time()
    lines = agent.ok("-l", "--json").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [list(e) for e in entries] == [["key", "value", "set", "origin"]] * 2
    assert [(e["key"], e["value"], e["origin"]) for e in entries] == [
        ("from-host", "h", "host"),
        ("from-guest", "g", "guest"),
    ]
    for e in entries:
        assert ISO_UTC.match(e["set"]), e["set"]
        stamp = calendar.timegm(time.strptime(e["set"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert before - 1 <= stamp + float("0" + e["set"][19:-1]) <= after + 1
    one = json.loads(agent.ok("-g", "from-guest", "--json"))
    assert one == entries[1]


def test_it_should_wake_a_waiter_when_another_process_sets_the_key(agent):
    waiter = subprocess.Popen(
        [OVMD, "-w", "later", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OVMD_SOCKET=agent.socket),
    )
    try:
        agent.ok("-p", "later=it came")
        set_done = time.monotonic()
        out, err = waiter.communicate(timeout=30)
        woken_after = time.monotonic() - set_done
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert (waiter.returncode, out, err) == (0, b"it came\n", b"")
    assert woken_after < 10.0  # woken by the daemon, not by its 30 s timeout


def test_it_should_return_at_once_when_the_awaited_key_exists(agent):
    agent.host_set("already", "here")
    assert agent.ok("-w", "already") == b"here\n"
    entry = json.loads(agent.ok("--wait", "already", "--json"))
    assert (entry["value"], entry["origin"]) == ("here", "host")


def test_it_should_wait_for_the_next_set_with_changed(agent):
    agent.ok("-p", "counter=old")
    waiter = subprocess.Popen(
        [OVMD, "-w", "counter", "--changed", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OVMD_SOCKET=agent.socket),
    )
    try:
        # The waiter may register before or after any one set: keep setting new values until it
        # answers. It must answer with one of them, never with the value it found.
        n = 0
        deadline = time.monotonic() + TIMEOUT * 2
        while waiter.poll() is None and time.monotonic() < deadline:
            n += 1
            agent.ok("-p", "counter=new-%d" % n)
            try:
                waiter.wait(0.3)
            except subprocess.TimeoutExpired:
                pass
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert (waiter.returncode, err) == (0, b"")
    assert re.match(rb"^new-\d+\n$", out), out


def test_it_should_give_up_waiting_after_the_timeout_with_1(agent):
    start = time.monotonic()
    result = agent.run("-w", "never", "--timeout", "0.5")
    assert time.monotonic() - start >= 0.5
    assert (result.returncode, result.stdout) == (1, b"")
    assert one_line(result.stderr) == (
        "ovmd: timed out after 0.5 s waiting for key never to be set\n"
    )


def test_it_should_print_the_recent_host_events(agent):
    agent.host_set("VMAPIEvent", "shutdown requested")
    assert agent.listing() == b""  # an event is not a stored key
    out = agent.ok("--events")
    assert out.splitlines()[-1] == b'{"VMAPIEvent":"shutdown requested"}'
    assert agent.ok("-e", "injected") == b""
    last = json.loads(agent.ok("--events", "--json").splitlines()[-1])
    assert (last["key"], last["value"], last["origin"]) == ("VMAPIEvent", "injected", "host")
    assert ISO_UTC.match(last["set"])


def test_it_should_refuse_several_values_past_one_frame_at_once_and_store_none(agent):
    # Nine 8 KiB values cannot travel in one request (65,536 bytes): refused before sending,
    # exit 2, one line naming the limit, and nothing stored (the -p values apply all or none).
    args = []
    for i in range(9):
        args += ["-p", "big%d=%s" % (i, "v" * 8192)]
    code, out, err = outcome(agent.run(*args, timeout=30))
    assert code == 2 and out == b""
    assert one_line(err).startswith("ovmd: the request is ") and "limit is 65536 bytes" in one_line(
        err
    )
    assert agent.listing() == b""
