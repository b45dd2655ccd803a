"""hostbridge.humanize, hostbridge.render and the pure parts of hostbridge.apiclient and
hostbridge.cli: the exact text, with a fixed clock."""

import pytest

from hostbridge import apiclient, humanize, render
from hostbridge.cli import manager


@pytest.mark.parametrize(
    "delta,text",
    [
        (0, "just now"),
        (0.5, "just now"),
        (-30, "just now"),
        (1, "1 second ago"),
        (59, "59 seconds ago"),
        (60, "1 minute ago"),
        (150, "2 minutes ago"),
        (3600, "1 hour ago"),
        (7300, "2 hours ago"),
        (86400 * 3, "3 days ago"),
        (-3600, "in the future (the clocks disagree)"),
    ],
)
def test_it_should_say_how_long_ago_in_words(delta, text):
    assert humanize.ago(1000000.0 - delta, 1000000.0) == text


@pytest.mark.parametrize(
    "delta,text",
    [
        (0, "0 minutes ago"),
        (59.9, "0 minutes ago"),
        (60, "1 minutes ago"),
        (119, "1 minutes ago"),
        (130, "2 minutes ago"),
        (3600 * 3 + 5, "180 minutes ago"),
        (86400 * 2, "2880 minutes ago"),
        (-30, "0 minutes ago"),
        (-3600, "0 minutes ago"),
    ],
)
def test_it_should_count_whole_minutes_in_the_original_form(delta, text):
    assert humanize.minutes_ago(1000000.0 - delta, 1000000.0) == text


NOW = 1795336469.0
ANSWER = {"vm": "vm1", "key": "newkey", "value": "newvalue", "ts": NOW - 150, "stale": False}


def test_it_should_word_a_query_answer_as_the_original_tools():
    assert render.query_lines(ANSWER, NOW) == [
        "Query for Key : 'newkey' returned value 'newvalue'.",
        "Key set 2 minutes ago.",
    ]
    assert render.query_lines(dict(ANSWER, ts=NOW - 0.2), NOW)[1] == "Key set just now."
    assert render.query_lines(dict(ANSWER, ts=NOW - 61), NOW)[1] == "Key set 1 minute ago."


@pytest.mark.parametrize(
    "age,line",
    [
        (0.2, "Key set 0 minutes ago."),
        (61, "Key set 1 minutes ago."),
        (150, "Key set 2 minutes ago."),
        (7300, "Key set 121 minutes ago."),
    ],
)
def test_it_should_give_ovm_vmmessage_whole_minutes(age, line):
    lines = render.query_lines(dict(ANSWER, ts=NOW - age), NOW, whole_minutes=True)
    assert lines == ["Query for Key : 'newkey' returned value 'newvalue'.", line]


def test_it_should_mark_a_stale_answer_and_say_when_the_agent_was_last_seen():
    stale = dict(ANSWER, stale=True, last_seen=NOW - 300)
    assert render.query_lines(stale, NOW)[2:] == ["(stale: the agent was last seen 5 minutes ago)"]
    assert render.query_lines(dict(stale, last_seen=None), NOW, whole_minutes=True)[1:] == [
        "Key set 2 minutes ago.",
        "(stale: the agent has not been seen since the bridge started)",
    ]


def test_it_should_render_error_and_usage_lines_on_one_escaped_line():
    assert render.error_line("vmmessage", "no VM named 'x'") == "vmmessage: error: no VM named 'x'"
    assert (
        render.error_line("ovm_vmmessage", "bad\n  \x1b[2Jthing")
        == "ovm_vmmessage: error: bad \\x1b[2Jthing"
    )
    assert (
        render.usage_line("vmmessage", "Missing argument 'VALUE'.", "vmmessage send")
        == "vmmessage: error: Missing argument 'VALUE' (see vmmessage send --help)"
    )


def test_it_should_render_the_vm_table_with_the_channel_unpadded():
    vms = [
        {
            "name": "web1",
            "run_state": "running",
            "agent": "connected",
            "queued": 0,
            "channel": "pty:/a",
        },
        {
            "name": "db",
            "run_state": "shutoff",
            "agent": "disconnected",
            "last_seen": NOW - 300,
            "queued": 2,
            "channel": "x",
        },
        {"name": "new", "agent": "disconnected", "last_seen": None, "channel": "y"},
    ]
    assert render.vm_table({"vms": vms}, NOW) == [
        "NAME  STATE    AGENT         LAST SEEN      QUEUED  CHANNEL",
        "web1  running  connected     now            0       pty:/a",
        "db    shutoff  disconnected  5 minutes ago  2       x",
        "new   unknown  disconnected  never          0       y",
    ]
    assert render.vm_table({"vms": []}, NOW)[1:] == ["(no VMs)"]


@pytest.mark.parametrize(
    "raw,shown",
    [
        ("plain text, ünïcødé and 中文", "plain text, ünïcødé and 中文"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x07\x7f", "\\x00\\x07\\x7f"),
        ("\x9b31m", "\\x9b31m"),
        ("abc\u202eevil", "abc\\u202eevil"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("line\u2028sep", "line\\u2028sep"),
        ("\U000e0041tag", "\\U000e0041tag"),
    ],
)
def test_it_should_make_every_control_or_format_character_visible(raw, shown):
    assert humanize.escape(raw) == shown
    assert humanize.escape(raw).isprintable()


@pytest.mark.parametrize(
    "segment,quoted",
    [
        ("a/b", "a%2Fb"),
        ("é z", "%C3%A9%20z"),
        ("a-b_c.d~", "a-b_c.d~"),
        ("100%", "100%25"),
        ("?#&=", "%3F%23%26%3D"),
    ],
)
def test_it_should_percent_encode_path_segments(segment, quoted):
    assert apiclient.quote(segment) == quoted


def test_it_should_build_api_paths_with_queries():
    assert (
        apiclient.path("vms", "x", "keys", "a/b", query={"timeout": 2.5})
        == "/v1/vms/x/keys/a%2Fb?timeout=2.5"
    )


@pytest.mark.parametrize(
    "hostport,expected",
    [
        ("h", ("h", 8443)),
        ("h:99", ("h", 99)),
        ("[::1]:7", ("::1", 7)),
        ("[::1]", ("::1", 8443)),
        (":5", ("localhost", 5)),
    ],
)
def test_it_should_split_host_and_port(hostport, expected):
    assert apiclient.split_hostport(hostport) == expected


@pytest.mark.parametrize("hostport", ["h:x", "h:0", "h:70000"])
def test_it_should_refuse_a_bad_port(hostport):
    with pytest.raises(apiclient.ApiError) as e:
        apiclient.split_hostport(hostport)
    assert e.value.code == "usage"


def test_it_should_refuse_plain_http():
    with pytest.raises(apiclient.ApiError) as e:
        apiclient.Client("http://host:80")
    assert e.value.code == "usage"


def test_it_should_parse_content_length_and_chunked_responses():
    assert apiclient.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk") == (
        200,
        b"{}",
    )
    chunked = (
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n'
    )
    assert apiclient.parse_response(chunked) == (404, b'{"a":1}')
    with pytest.raises(ValueError):
        apiclient.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    with pytest.raises(ValueError):
        apiclient.parse_response(b"garbage")


@pytest.mark.parametrize(
    "code,status",
    [
        ("not_found", 1),
        ("unknown_vm", 1),
        ("key_too_long", 2),
        ("bad_request", 2),
        ("unreachable", 3),
        ("agent_timeout", 4),
        ("agent_not_connected", 5),
        ("unauthorized", 6),
        ("busy", 7),
        ("internal", 7),
        ("anything", 7),
    ],
)
def test_it_should_map_error_codes_to_exit_statuses(code, status):
    assert apiclient.exit_code(code) == status


def test_it_should_word_the_manager_cli_answer():
    args = ["Vm", "name=vm1", "key=k", "message=m"]
    assert render.manager_lines(args, NOW, doc={"outcome": "delivered", "vm": "vm1"}) == [
        "Command: sendVmMessage Vm name=vm1 key=k message=m",
        "Status: Success",
        "Time: 2026-11-22 08:34:29,000 UTC",
    ]
    assert render.manager_lines(args, NOW, error="no VM named 'vm1'")[1:] == [
        "Status: Failure",
        "Time: 2026-11-22 08:34:29,000 UTC",
        "Error Msg: no VM named 'vm1'",
    ]
    assert render.manager_lines(args, NOW, doc={"outcome": "queued", "vm": "vm1"})[3:] == [
        "Message queued: the agent in VM 'vm1' is not connected; it will be delivered when it "
        "connects."
    ]


def test_it_should_format_the_manager_time_in_utc_with_milliseconds():
    assert render.manager_time(1795336469.8905) == "2026-11-22 08:34:29,890 UTC"


@pytest.mark.parametrize(
    "args,error",
    [
        (["Server", "name=x"], "'Vm'"),
        (["Vm", "name=x", "key=k"], "message="),
        (["Vm", "name=x", "key=k", "message=m", "log=maybe"], "log="),
        (["Vm", "name=x", "name=y", "key=k", "message=m"], "twice"),
        (["Vm", "colour=red"], "unexpected"),
    ],
)
def test_it_should_refuse_bad_manager_arguments(args, error):
    with pytest.raises(ValueError, match=error):
        manager.parse_manager_args(args)


def test_it_should_keep_an_equals_sign_inside_the_manager_message():
    assert manager.parse_manager_args(["vm", "name=x", "key=k", "message=a=b"])["message"] == "a=b"


@pytest.mark.parametrize(
    "run_state,agent,word",
    [
        ("running", "disconnected", "Running"),
        ("paused", "connected", "Suspended"),
        ("shutoff", "disconnected", "Stopped"),
        ("crashed", "disconnected", "Error"),
        ("migrating", "connected", "Migrating"),
        # No run state from libvirt: only an answering agent proves the VM runs.
        ("unknown", "connected", "Running"),
        ("unknown", "disconnected", "Unknown"),
        ("unknown", "connecting", "Unknown"),
        (None, "disconnected", "Unknown"),
    ],
)
def test_it_should_give_the_managers_word_for_each_run_state(run_state, agent, word):
    vm = {"name": "vm1", "agent": agent}
    if run_state is not None:
        vm["run_state"] = run_state
    assert render.manager_status(vm) == word


@pytest.mark.parametrize(
    "run_state,send,rm",
    [
        (
            "shutoff",
            "Message queued: VM 'vm1' is shut off; it will be delivered at its next boot.",
            "Deletion queued: VM 'vm1' is shut off; it will be done at its next boot.",
        ),
        (
            "crashed",
            "Message queued: VM 'vm1' has crashed; it will be delivered at its next boot.",
            "Deletion queued: VM 'vm1' has crashed; it will be done at its next boot.",
        ),
    ]
    + [
        (
            state,
            "Message queued: the agent in VM 'vm1' is not connected; it will be delivered when "
            "it connects.",
            "Deletion queued: the agent in VM 'vm1' is not connected; it will be done when it "
            "connects.",
        )
        for state in ("running", "paused", "migrating", "unknown", None)
    ],
)
def test_it_should_say_a_queued_message_waits_for_the_next_boot_only_when_not_running(
    run_state, send, rm
):
    doc = {"vm": "vm1", "key": "k", "outcome": "queued", "seq": 1, "run_state": run_state}
    assert render.send_lines(doc, NOW) == [send]
    assert render.rm_lines(doc, NOW) == [rm]
    doc["outcome"] = "delivered"
    assert render.send_lines(doc, NOW) == ["Message sent successfully."]


def test_it_should_show_the_run_state_in_the_status():
    vm = {"name": "vm1", "channel": "unix:/c", "source": "discovered", "agent": "disconnected"}
    assert render.status_lines(vm, NOW)[2] == "State: unknown"
    assert render.status_lines(dict(vm, run_state="paused"), NOW)[2:4] == [
        "State: paused",
        "Agent: disconnected",
    ]
