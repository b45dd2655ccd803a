import os

import pytest

from guestagent import config
from guestagent.config import Config, ConfigError, load, read_file


def write(tmp_path, text):
    p = tmp_path / "ovmd.conf"
    p.write_text(text)
    return str(p)


def test_it_should_use_the_defaults_when_the_file_is_missing(tmp_path):
    c = load(str(tmp_path / "missing.conf"))
    assert c.channel is None
    assert c.socket == "/run/ovmd/ovmd.sock"
    assert c.state_dir == "/run/ovmd"
    assert (c.max_keys, c.max_events, c.group, c.debug) == (1024, 64, None, 2)


def test_it_should_read_the_ovmd_section_with_comments_and_either_spelling(tmp_path):
    path = write(
        tmp_path,
        "# a comment\n; another\n[ovmd]\nsocket = /tmp/x.sock\n"
        "state-dir=/var/lib/ovmd\n  max_keys = 10  \ngroup = wheel\n"
        "debug = 1\nchannel = /dev/vport1p1\n\n[bridge]\nsocket = /other\n",
    )
    c = load(path)
    assert (c.socket, c.state_dir, c.max_keys, c.group, c.debug, c.channel) == (
        "/tmp/x.sock",
        "/var/lib/ovmd",
        10,
        "wheel",
        1,
        "/dev/vport1p1",
    )


def test_keys_before_any_section_should_count_as_ovmd(tmp_path):
    assert load(write(tmp_path, "max_events = 3\n")).max_events == 3


def test_channel_auto_should_mean_find_the_port(tmp_path):
    assert load(write(tmp_path, "[ovmd]\nchannel = auto\n")).channel is None


def test_overrides_should_win_over_the_file_and_none_should_mean_not_given(tmp_path):
    path = write(tmp_path, "[ovmd]\nmax_keys = 10\nsocket = /tmp/a.sock\n")
    c = load(path, {"max_keys": "20", "socket": None, "state-dir": "/s", "debug": 0})
    assert (c.max_keys, c.socket, c.state_dir, c.debug) == (20, "/tmp/a.sock", "/s", 0)


@pytest.mark.parametrize(
    "text, line, key",
    [
        ("[ovmd]\nmax_keys = lots\n", 2, "max_keys"),
        ("[ovmd]\n\nmax_events = 0\n", 3, "max_events"),
        ("[ovmd]\ndebug = 3\n", 2, "debug"),
        ("[ovmd]\nsocket =\n", 2, "socket"),
        ("[ovmd]\nsocket = /" + "x" * 120 + "\n", 2, "socket"),
        ("[ovmd]\nsokcet = /tmp/s\n", 2, "sokcet"),
        ("[ovmd]\nmax_clients_per_user = 0\n", 2, "max_clients_per_user"),
        ("[ovmd]\nrequest_timeout = 0\n", 2, "request_timeout"),
        ("[ovmd]\n\nidle_timeout = nan\n", 3, "idle_timeout"),
        ("[ovmd]\nidle_timeout = soon\n", 2, "idle_timeout"),
    ],
)
def test_a_bad_setting_should_be_one_line_naming_file_line_and_key(tmp_path, text, line, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("%s line %d: " % (path, line))
    assert key in msg


def test_a_line_without_equals_should_be_an_error_naming_the_line(tmp_path):
    path = write(tmp_path, "[ovmd]\nsocket /tmp/s\n")
    with pytest.raises(ConfigError, match=r"line 2: expected 'key = value'"):
        load(path)


def test_a_bad_override_should_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^option --max-keys must be a whole number"):
        load(str(tmp_path / "none"), {"max_keys": "x"})


def test_an_unreadable_file_should_be_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path))  # a directory


def test_read_file_should_return_raw_strings_and_nothing_for_a_missing_file(tmp_path):
    path = write(tmp_path, "[ovmd]\nsocket = /tmp/s.sock\nmax_keys = 5\n")
    assert read_file(path) == {"socket": "/tmp/s.sock", "max_keys": "5"}
    assert read_file(str(tmp_path / "missing")) == {}


def test_the_module_should_import_nothing_heavy():
    # The CLI reads the socket path from this module on its hot path.
    import ast

    tree = ast.parse(open(config.__file__).read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"os", "ovmproto.errors"}


def test_config_should_refuse_unknown_fields():
    with pytest.raises(TypeError):
        Config(bogus=1)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def indented_block(text, first_line):
    """The indented block of ``text`` that starts with the line ``first_line`` (unindented)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == first_line)
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_the_example_file_in_docs_cli_md_should_load_as_it_is_written(tmp_path):
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        example = indented_block(f.read(), "[ovmd]")
    assert " # " in example  # the doc's example has inline comments: this test is about them
    c = load(write(tmp_path, example))
    assert (c.channel, c.socket, c.state_dir, c.max_keys, c.max_events, c.group, c.debug) == (
        "/dev/virtio-ports/com.oracle.ovmd",
        "/run/ovmd/ovmd.sock",
        "/run/ovmd",
        1024,
        64,
        "ovmd",
        2,
    )


def test_the_example_file_in_the_module_docstring_should_load_as_it_is_written(tmp_path):
    c = load(write(tmp_path, indented_block(config.__doc__, "[ovmd]")))
    assert (c.channel, c.group, c.debug) == ("/dev/virtio-ports/com.oracle.ovmd", "ovmd", 2)


@pytest.mark.parametrize(
    "line, value",
    [
        ("group = wheel # who may use the socket", "wheel"),
        ("group = wheel\t; who may use the socket", "wheel"),
        ("group = wheel   #", "wheel"),
        ("group = wh#eel", "wh#eel"),
        ("group = wh;eel ; but this is a comment", "wh;eel"),
        ("socket = /tmp/a#b.sock", "/tmp/a#b.sock"),
    ],
)
def test_an_inline_comment_should_end_the_value_only_after_whitespace(tmp_path, line, value):
    assert read_file(write(tmp_path, "[ovmd]\n%s\n" % line)) == {line.split()[0]: value}


def test_a_section_header_may_carry_a_comment(tmp_path):
    assert (
        load(
            write(tmp_path, "[other]  # ignored\nmax_keys = 5\n[ovmd] # ours\nmax_keys = 7\n")
        ).max_keys
        == 7
    )


def test_the_local_socket_limits_should_read_counts_and_seconds(tmp_path):
    path = write(
        tmp_path,
        "[ovmd]\nmax_clients = 8\nmax-clients-per-user = 3\nreserved_root_clients = 2\n"
        "request_timeout = 0.5\nidle_timeout = 60\n",
    )
    c = load(path)
    assert (c.max_clients, c.max_clients_per_user, c.reserved_root_clients) == (8, 3, 2)
    assert (c.request_timeout, c.idle_timeout) == (0.5, 60.0)


def test_root_should_keep_at_least_one_slot_of_its_own(tmp_path):
    path = write(tmp_path, "[ovmd]\nmax_clients = 4\nreserved_root_clients = 4\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (
        "%s: reserved_root_clients (4) must be less than max_clients (4)" % path
    )
