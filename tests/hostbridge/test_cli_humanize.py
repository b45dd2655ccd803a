"""hostbridge.humanize and the pure parts of hostbridge.apiclient and hostbridge.cli."""

import pytest

from hostbridge import apiclient, cli, humanize


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


def test_it_should_format_the_manager_time_in_utc_with_milliseconds():
    assert cli.manager_time(1795336469.8905) == "2026-11-22 08:34:29,890 UTC"


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
        cli.parse_manager_args(args)


def test_it_should_keep_an_equals_sign_inside_the_manager_message():
    assert cli.parse_manager_args(["vm", "name=x", "key=k", "message=a=b"])["message"] == "a=b"
