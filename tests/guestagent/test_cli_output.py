"""guestagent.output: the exact bytes ovmd prints."""

import json
import os

import pytest

from guestagent import output


def test_it_should_print_a_pair_as_the_original_did():
    assert output.pair_line("foo", "bar") == b'{"foo":"bar"}\n'


def test_it_should_keep_non_ascii_text_as_utf8():
    line = '{"clé":"värde ✓ 😀"}\n'.encode()
    assert output.pair_line("clé", "värde ✓ 😀") == line


def test_it_should_escape_what_json_must_escape_so_a_line_stays_one_line():
    line = output.pair_line('a"b', 'x\ny\t"\\\x00')
    assert line == b'{"a\\"b":"x\\ny\\t\\"\\\\\\u0000"}\n'
    assert line.count(b"\n") == 1
    assert json.loads(line) == {'a"b': 'x\ny\t"\\\x00'}


def test_it_should_print_a_bare_value_and_a_newline():
    assert output.value_line("my value = 1") == b"my value = 1\n"
    assert output.value_line("") == b"\n"
    assert output.value_line("ü") == "ü\n".encode()


def test_it_should_never_fail_on_a_lone_surrogate():
    assert output.value_line("a\udcffb") == b"a\\udcffb\n"
    assert json.loads(output.pair_line("k", "a\udcffb")) == {"k": "a\udcffb"}


@pytest.mark.parametrize(
    "ts, text",
    [
        (0, "1970-01-01T00:00:00.000000Z"),
        (0.5, "1970-01-01T00:00:00.500000Z"),
        (1795316645.123456, "2026-11-22T03:04:05.123456Z"),
        (1795316645.9999996, "2026-11-22T03:04:06.000000Z"),  # rounds up into the next second
        (1795316645, "2026-11-22T03:04:05.000000Z"),
    ],
)
def test_it_should_format_set_times_as_iso_8601_utc(ts, text):
    assert output.iso_utc(ts) == text


@pytest.mark.parametrize("ts", [None, "1", True, float("nan"), 1e300])
def test_it_should_give_none_for_something_that_is_not_a_time(ts):
    assert output.iso_utc(ts) is None


def test_it_should_print_an_entry_with_its_time_and_origin_in_this_order():
    line = output.entry_line(
        {"key": "k", "value": "v", "ts": 1795316645.123456, "origin": "host", "t": "item", "id": 3}
    )
    assert line == (
        b'{"key":"k","value":"v","set":"2026-11-22T03:04:05.123456Z","origin":"host"}\n'
    )


def test_it_should_join_lines_in_the_given_order():
    entries = [{"key": "b", "value": "2"}, {"key": "a", "value": "1"}]
    assert output.pair_lines(entries) == b'{"b":"2"}\n{"a":"1"}\n'
    assert output.pair_lines([]) == b""


def test_it_should_write_everything_through_a_small_pipe():
    r, w = os.pipe()
    data = b"x" * 300000  # more than a pipe holds: needs several writes
    got = bytearray()
    try:
        pid = os.fork()
        if pid == 0:  # the writer, in a child so the parent can drain the pipe
            os.close(r)
            try:
                output.write_all(w, data)
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            got += chunk
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert bytes(got) == data


def test_it_should_raise_broken_pipe_when_the_reader_is_gone():
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(BrokenPipeError):
            output.write_all(w, b"x")
    finally:
        os.close(w)
