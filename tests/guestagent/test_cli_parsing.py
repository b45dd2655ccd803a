"""guestagent.cli without a daemon: both parsers, their agreement, input checks, the socket path."""

import pytest

from guestagent import cli
from guestagent.client import EXIT_USAGE, BadInput


def click_plan(args):
    """The Plan the click parser makes of ``args`` (parse only; nothing runs)."""
    command = cli.build_command()
    ctx = command.make_context("ovmd", list(args))
    return cli.plan_from_options(ctx.params)


def fields(plan):
    return {name: getattr(plan, name) for name in cli.Plan.__slots__}


FAST_SHAPES = [
    ["-g", "mykey"],
    ["-g", ""],
    ["-g", "clé ✓"],
    ["-l"],
    ["-x"],
    ["-r", "mykey"],
    ["-p", "newkey=newvalue"],
    ["-p", "a=1", "-p", "b=2=3", "-p", "c="],
    ["--socket", "/tmp/x.sock", "-g", "k"],
    ["--socket", "/tmp/x.sock", "-l"],
    ["--socket", "/tmp/x.sock", "-p", "k=v", "-p", "k2=v2"],
]


@pytest.mark.parametrize("args", FAST_SHAPES, ids=lambda a: " ".join(a))
def test_it_should_read_script_shapes_on_the_fast_path_exactly_as_click_does(args):
    fast = cli.fast_plan(args)
    assert fast is not None
    assert fields(fast) == fields(click_plan(args))


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-g"],
        ["-g", "-l"],  # a key that looks like an option: click decides
        ["-g", "k", "-l"],
        ["--get-param", "k"],
        ["-gk"],
        ["-p"],
        ["-p", "a=b", "-x"],
        ["-p", "a=b", "-p"],
        ["-l", "--json"],
        ["--socket", "/s"],
        ["--socket", "-l", "-l"],
        ["-v"],
        ["-h"],
        ["--daemon"],
    ],
)
def test_it_should_leave_every_other_shape_to_click(args):
    assert cli.fast_plan(args) is None


@pytest.mark.parametrize(
    "fast, slow",
    [
        (["-g", "k"], ["--get-param", "k"]),
        (["-g", "k"], ["--get-param=k"]),
        (["-g", "k"], ["-gk"]),
        (["-l"], ["--list-params"]),
        (["-x"], ["--delete-params"]),
        (["-r", "k"], ["--delete-param", "k"]),
        (["-p", "a=b=c"], ["--set-param=a=b=c"]),
        (["-p", "a=1", "-p", "b=2"], ["--set-param", "a=1", "--set-param=b=2"]),
    ],
)
def test_it_should_make_the_same_plan_of_long_and_short_forms(fast, slow):
    assert fields(cli.fast_plan(fast)) == fields(click_plan(slow))


def test_it_should_read_the_additions():
    plan = click_plan(["-w", "k", "--timeout", "2.5", "--changed", "--json", "--socket", "/s"])
    assert (plan.action, plan.key, plan.timeout, plan.changed, plan.as_json, plan.socket) == (
        "wait",
        "k",
        2.5,
        True,
        True,
        "/s",
    )
    assert click_plan(["--events"]).action == "events"
    assert click_plan(["-e", "reboot"]).value == "reboot"
    assert click_plan(["-l", "--json"]).as_json is True


def test_it_should_accept_the_compatibility_options_and_ignore_them():
    plan = click_plan(["-d", "0", "-f", "/run/ovmd.pid", "-t", "10", "-g", "k"])
    assert (plan.action, plan.key) == ("get", "k")


def test_it_should_make_no_plan_for_the_daemon():
    assert (
        click_plan(
            [
                "--daemon",
                "--channel",
                "/dev/pts/3",
                "--state-dir",
                "/tmp/s",
                "--max-keys",
                "5",
                "--group",
                "ovmd",
                "-d",
                "1",
            ]
        )
        is None
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no action given; try 'ovmd --help'"),
        (["-l", "-g", "k"], "-l and -g cannot be combined; give one action per call"),
        (["-p", "a=b", "-x"], "-p and -x cannot be combined; give one action per call"),
        (["-s", "cleanup", "-l"], "-l and -s cannot be combined; give one action per call"),
        (["-x", "--json"], "--json applies to -l, -g, -w and --events only"),
        (["-g", "k", "--changed"], "--changed applies to -w only"),
        (["-g", "k", "--timeout", "1"], "--timeout applies to -w only"),
        (["-g", "k", "--channel", "/dev/x"], "--channel only applies to --daemon"),
        (["--daemon", "--json"], "--json does not apply to --daemon"),
    ],
)
def test_it_should_refuse_nonsensical_combinations(args, message):
    with pytest.raises(BadInput) as ei:
        click_plan(args)
    assert str(ei.value) == message
    assert ei.value.exit_code == EXIT_USAGE


def test_it_should_split_pairs_at_the_first_equals_sign():
    assert cli.parse_pairs(["a=b=c", "k=", "ключ=значение"]) == [
        ["a", "b=c"],
        ["k", ""],
        ["ключ", "значение"],
    ]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("secret", "-p expects KEY=VALUE, and its argument has no '='"),
        ("=v", "key is empty"),
        ("k" * 257 + "=v", "key is 257 bytes, the limit is 256 bytes"),
        ("é" * 129 + "=v", "key is 258 bytes, the limit is 256 bytes"),
        ("k\x01=v", "key contains control character U+0001, which is not allowed"),
        ("k=" + "v" * 8193, "value is 8193 bytes, the limit is 8192 bytes"),
        ("k=" + "€" * 2731, "value is 8193 bytes, the limit is 8192 bytes"),
        ("k\udcff=v", "key is not valid UTF-8"),  # a non-UTF-8 byte in argv (surrogateescape)
    ],
)
def test_it_should_refuse_bad_pairs_without_echoing_the_value(arg, message):
    with pytest.raises(BadInput) as ei:
        cli.parse_pairs([arg])
    assert str(ei.value) == message
    assert "secret" not in str(ei.value) and "vvv" not in str(ei.value)


def test_it_should_accept_a_key_and_a_value_exactly_at_their_limits():
    key, value = "k" * 256, "v" * 8192
    assert cli.parse_pairs([key + "=" + value]) == [[key, value]]


def test_it_should_refuse_everything_when_one_pair_of_several_is_bad():
    with pytest.raises(BadInput):
        cli.parse_pairs(["a=1", "b", "c=3"])


class TestSocketPath:
    def test_it_should_prefer_the_option(self, tmp_path):
        assert (
            cli.socket_path("/opt.sock", str(tmp_path / "none.conf"), {"OVMD_SOCKET": "/env.sock"})
            == "/opt.sock"
        )

    def test_it_should_then_take_the_environment(self, tmp_path):
        conf = tmp_path / "ovmd.conf"
        conf.write_text("[ovmd]\nsocket = /conf.sock\n")
        assert cli.socket_path(None, str(conf), {"OVMD_SOCKET": "/env.sock"}) == "/env.sock"

    def test_it_should_then_read_the_config_file(self, tmp_path):
        conf = tmp_path / "ovmd.conf"
        conf.write_text("# comment\n[ovmd]\nsocket = /conf.sock\n[other]\nsocket = /no\n")
        assert cli.socket_path(None, str(conf), {}) == "/conf.sock"

    def test_it_should_fall_back_to_the_default(self, tmp_path):
        assert cli.socket_path(None, str(tmp_path / "none.conf"), {}) == "/run/ovmd/ovmd.sock"

    def test_it_should_report_a_broken_config_file_in_one_line(self, tmp_path):
        conf = tmp_path / "ovmd.conf"
        conf.write_text("[ovmd\n")
        with pytest.raises(BadInput) as ei:
            cli.socket_path(None, str(conf), {})
        assert str(ei.value) == "%s line 1: section header without ']'" % conf
        assert ei.value.exit_code == EXIT_USAGE


# -- ovmd --daemon without click -----------------------------------------------------------------


def test_the_lean_daemon_parser_should_know_exactly_clicks_daemon_options():
    daemon_params = {
        "channel",
        "socket",
        "state_dir",
        "config",
        "max_keys",
        "max_events",
        "group",
        "facts",
        "debug",
        "pid_file",
        "time_period",
    }
    from_click = {}
    for param in cli.build_command().params:
        if param.name in daemon_params:
            for flag in param.opts:
                from_click[flag] = param.name
    lean = {
        flag: (
            dest
            or {
                "-f": "pid_file",
                "--pid-file": "pid_file",
                "-t": "time_period",
                "--time-period": "time_period",
            }[flag]
        )
        for flag, dest in cli.DAEMON_OPTIONS.items()
    }
    assert lean == from_click


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--daemon"], {}),
        (
            ["--daemon", "--channel", "/dev/x", "--max-keys=5", "-d", "1", "-t", "10"],
            {"channel": "/dev/x", "max_keys": "5", "debug": "1"},
        ),
        (
            ["-d", "0", "--daemon", "--state-dir=/var/lib/ovmd"],
            {"debug": "0", "state_dir": "/var/lib/ovmd"},
        ),
        (["--daemon", "--json"], None),  # click explains that --json does not apply
        (["--daemon", "--channel"], None),  # click explains the missing value
        (["--daemon", "-d2"], None),
        (["--daemon", "-d=2"], None),
        (["-l"], None),
    ],
)
def test_the_lean_daemon_parser_should_take_plain_daemon_command_lines_only(args, expected):
    assert cli.daemon_options(args) == expected
