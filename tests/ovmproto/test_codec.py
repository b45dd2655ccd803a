"""encode/decode and the Reader: bad input is reported as an event, never raised or crashed on."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto.codec import Reader, decode, encode
from ovmproto.errors import BadFrame, BadMessage, FrameTooLong, ProtocolError
from ovmproto.framing import RESYNC, Resync
from ovmproto.messages import Err, Ok, Ping, Set

SECRET = "hunter2-root-password"


def test_it_should_encode_compact_json_ending_with_one_delimiter():
    assert encode(Ping(id=5)) == b'{"t":"ping","id":5}\n'
    assert (
        encode(Set(id=1, key="k", value="a\nb"))
        == b'{"t":"set","id":1,"key":"k","value":"a\\nb"}\n'
    )


@settings(max_examples=200, deadline=None)
@given(key=st.text(), value=st.text())
def test_an_encoded_frame_should_never_hold_a_raw_newline_or_a_resync_byte(key, value):
    frame = encode(Set(id=1, key=key, value=value))
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    assert RESYNC not in frame


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc3\x28",  # a broken two-byte sequence
        b'{"t":"ping","id":1,"x":"\xc3"}',  # truncated sequence inside a string
        b'{"t":"ping","id":1,"x":"\xed\xa0\x80"}',  # an encoded surrogate (CESU), not UTF-8
        b'{"t":"ping","id":1,"x":"\xc0\xaf"}',  # an overlong encoding of "/"
        b'{"t":"ping","id":1,"x":"\xf8\x88\x80\x80\x80"}',
    ],
)
def test_it_should_report_invalid_utf8_as_a_bad_frame(frame):
    with pytest.raises(BadFrame) as info:
        decode(frame)
    assert info.value.code == "bad_frame"
    # Named as an encoding problem, not blamed on the JSON.
    assert "UTF-8" in info.value.message and "JSON" not in info.value.message


def test_it_should_refuse_a_lone_surrogate_escape():
    # JSON may spell a surrogate as \ud800; such a string cannot be re-encoded, so refuse the frame.
    with pytest.raises(BadFrame):
        decode(b'{"t":"set","id":1,"key":"\\ud800","value":"x"}')


@pytest.mark.parametrize(
    "frame",
    [
        b"{",
        b"}",
        b'{"t":"ping","id":1',
        b'{"t":"ping" "id":1}',
        b"{'t':'ping'}",
        b"NaN",
        b'{"t":"ping","id":1}{"t":"ping","id":2}',
        b'{"t":"ping","id":01}',
        b'{"t":"ping","id":1,}',
        b'{"t":"wait","id":1,"key":"k","timeout":NaN}',
        b'{"t":"wait","id":1,"key":"k","timeout":1e400}',
        b"\xef\xbb\xbf{}",
    ],
)
def test_it_should_report_invalid_json_as_a_bad_frame(frame):
    with pytest.raises(BadFrame) as info:
        decode(frame)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize(
    "frame", [b"[]", b'"ping"', b"1", b"null", b"true", b'[{"t":"ping","id":1}]']
)
def test_it_should_report_a_frame_that_is_not_an_object_as_a_bad_frame(frame):
    with pytest.raises(BadFrame) as info:
        decode(frame)
    assert "not a JSON object" in info.value.message


@pytest.mark.parametrize(
    "frame",
    [
        b"[" * 100000,
        b"[" * 100000 + b"]" * 100000,
        b'{"a":' * 50000 + b"1" + b"}" * 50000,
        b'{"t":"ping","id":1,"x":' + b"[" * 100000 + b"]" * 100000 + b"}",
    ],
)
def test_it_should_report_deep_nesting_as_a_bad_frame_not_a_recursion_error(frame):
    with pytest.raises(BadFrame):
        decode(frame)
    # Through a Reader (with a limit that lets such a frame through): an event, then the next frame.
    events = Reader(max_frame=len(frame)).feed(frame + b"\n" + encode(Ping(id=2)))
    assert [type(e) for e in events] == [BadFrame, Ping]


def test_it_should_report_deep_nesting_within_the_frame_limit_as_a_bad_frame():
    frame = b"[" * 30000 + b"]" * 30000
    events = Reader().feed(frame + b"\n" + encode(Ping(id=2)))
    assert [type(e) for e in events] == [BadFrame, Ping]


def test_it_should_report_a_missing_type_with_the_request_id():
    with pytest.raises(BadMessage) as info:
        decode(b'{"id":7,"key":"k"}')
    assert (info.value.code, info.value.request_id) == ("bad_request", 7)
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":5,"id":7}')
    assert (info.value.code, info.value.request_id) == ("bad_request", 7)


def test_it_should_report_an_unknown_type_with_the_request_id_when_the_id_is_usable():
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":"frobnicate","id":42,"extra":[1,2]}')
    assert info.value.code == "unknown_type"
    assert info.value.request_id == 42
    assert "frobnicate" in info.value.message


@pytest.mark.parametrize(
    "rid",
    [
        b"-1",
        b"1.0",
        b"1.5",
        b"true",
        b"false",
        b'"1"',
        b"null",
        b"[1]",
        b"9223372036854775808",
        b"18446744073709551615",
        b"100000000000000000000000000000",
    ],
)
def test_it_should_report_an_unknown_type_without_a_request_id_when_the_id_is_unusable(rid):
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":"frobnicate","id":' + rid + b"}")
    assert info.value.code == "unknown_type"
    assert info.value.request_id is None


def test_the_largest_usable_id_of_an_unknown_type_should_be_reported():
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":"frobnicate","id":9223372036854775807}')
    assert info.value.request_id == 2**63 - 1
    # ... and it can be echoed in an Err the peer decodes.
    err = Err(id=info.value.request_id, code=info.value.code, msg=info.value.message)
    assert decode(encode(err)[:-1]) == err


def test_an_error_should_never_carry_the_frame_content_in_its_message():
    frames = [
        b'{"t":"set","id":1,"key":"k","value":"' + SECRET.encode() + b'"',  # not JSON
        b'{"t":"set","id":1,"key":"k","value":"' + SECRET.encode() + b'\xc3"}',  # not UTF-8
        b'["' + SECRET.encode() + b'"]',  # not an object
        b'{"t":"set","id":1,"key":"k","value":["' + SECRET.encode() + b'"]}',  # wrong type
        b'{"t":"set","id":1,"key":"k","value":"' + SECRET.encode() + b'","seq":-1}',
    ]
    for frame in frames:
        with pytest.raises(ProtocolError) as info:
            decode(frame)
        assert SECRET not in str(info.value) + repr(info.value), frame
        assert len(info.value.raw) <= 64


def test_an_unknown_type_should_be_named_in_the_error_cut_to_32_characters():
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":"' + b"z" * 1000 + b'","id":1}')
    assert "z" * 32 in info.value.message
    assert "z" * 33 not in info.value.message


def test_the_reader_should_return_errors_as_events_and_go_on():
    data = (
        b"garbage\n"
        + b'{"t":"nope","id":3}\n'
        + b'{"t":"ping"}\n'
        + b"\xc3\x28\n"
        + b'{"t":"ping","id":4}\n'
    )
    events = Reader().feed(data)
    assert [type(e) for e in events] == [BadFrame, BadMessage, BadMessage, BadFrame, Ping]
    assert events[1].code == "unknown_type" and events[1].request_id == 3
    assert events[2].code == "bad_request" and events[2].request_id is None
    assert events[4] == Ping(id=4)


def test_the_reader_should_pass_resync_and_frame_too_long_through():
    r = Reader(max_frame=100)
    events = r.feed(b"x" * 150 + b"\n" + b'{"t":"pi' + RESYNC + b'{"t":"ping","id":1}\n')
    assert type(events[0]) is FrameTooLong and events[0].size == 150
    assert events[1:] == [Resync(dropped=8), Ping(id=1)]
    assert r.buffered == 0


def test_the_reader_should_report_buffered_bytes_and_forget_them_on_reset():
    r = Reader()
    assert r.feed(b'{"t":"ping",') == []
    assert r.buffered == 12
    r.reset()
    assert r.buffered == 0
    assert r.feed(b'{"t":"ping","id":1}\n') == [Ping(id=1)]


def test_the_reader_should_decode_the_same_messages_for_any_chunking():
    rng = random.Random(99)
    msgs = []
    for i in range(200):
        msgs.append(Set(id=i, key="key.%d" % i, value='é\x01"' * rng.randrange(100), seq=i + 1))
        msgs.append(Ok(id=i, seq=i + 1, dup=bool(i % 2)))
    data = b"".join(encode(m) for m in msgs)
    for size in (1, 7, 4096, len(data)):
        r = Reader()
        events = []
        for i in range(0, len(data), size):
            events.extend(r.feed(data[i : i + size]))
        assert events == msgs, size
