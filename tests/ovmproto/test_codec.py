"""encode/decode and the Reader: bad input is reported as an event, never raised or crashed on."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto.codec import EntryReplies, Reader, decode, encode, encode_entry, quick_request
from ovmproto.errors import BadFrame, BadMessage, FrameTooLong, ProtocolError
from ovmproto.framing import RESYNC, Resync
from ovmproto.messages import Err, Get, Item, Ok, Ping, Set

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


# ---- the hot path: quick_request and encode_entry ------------------------------------------

_ID_MAX = 2**63 - 1
ids = st.one_of(st.integers(0, _ID_MAX), st.sampled_from([0, 1, 9, 10, _ID_MAX]))
keys = st.text(max_size=40)


def decoded_as(frame):
    """What decode() makes of a frame, as quick_request would say it: (id, key) or an error.
    (A trailing space changes nothing in JSON, but keeps the frame off every quick path.)"""
    try:
        msg = decode(frame + b" ")
    except ProtocolError as e:
        return ("refused", type(e).__name__)
    if type(msg) is Ping:
        return (msg.id, None)
    if type(msg) is Get:
        return (msg.id, msg.key)
    return ("other", type(msg).__name__)


@settings(max_examples=300, deadline=None)
@given(rid=ids, key=keys)
def test_quick_request_should_read_the_encoders_ping_and_get_as_decode_does(rid, key):
    ping = encode(Ping(id=rid))[:-1]
    assert quick_request(ping) == decoded_as(ping) == (rid, None)
    get = encode(Get(id=rid, key=key))[:-1]
    quick = quick_request(get)
    assert decoded_as(get) == (rid, key)
    # Every key written without an escape is read on the quick path; the others may be left
    # to decode().
    if b"\\" not in get and key.isprintable():
        assert quick == (rid, key)
    else:
        assert quick in (None, (rid, key))


# Frames near the ping and get the encoder writes: each piece right or slightly wrong.
_prefixes = st.sampled_from(
    [b'{"t":"ping","id":', b'{"t":"get","id":', b'{"t": "get","id":', b'{"t":"get","id" :']
    + [b'{"t":"ok","id":', b'{"t":"ok", "id":']
)
_digits = st.one_of(
    ids.map(lambda i: b"%d" % i),
    st.sampled_from([b"", b"0", b"00", b"01", b"-1", b"1.0", b"1e3", b"9223372036854775808"]),
    st.sampled_from([b"18446744073709551615", b"123456789012345678901234567890", b" 5", b"5 "]),
    st.sampled_from([b"\xd9\xa3", b"true", b"null", b'"7"']),
)
_key_bodies = st.one_of(
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=12),
    st.sampled_from([b"", b'"', b"\\", b"\\u0061", b"\\n", b"\x01", b"\x7f", b"\xc3\x28"]),
    st.sampled_from([b"\xed\xa0\x80", b'a","x":"b', b'a","key":"b', b"\xe2\x80\xa8", b"\t"]),
)
_middles = st.sampled_from([b',"key":"', b',"key": "', b', "key":"', b',"kex":"', b',"key":'])
_ends = st.sampled_from([b"}", b'"}', b'" }', b'"}}', b'","x":1}', b"", b'"', b"} "])
near_frames = st.one_of(
    st.tuples(_prefixes, _digits, _ends).map(b"".join),
    st.tuples(_prefixes, _digits, _middles, _key_bodies, _ends).map(b"".join),
)


@settings(max_examples=2000, deadline=None)
@given(near_frames)
def test_quick_request_should_never_read_a_frame_otherwise_than_decode(frame):
    quick = quick_request(frame)
    if quick is not None:
        assert decoded_as(frame) == quick


def outcome_of(frame):
    try:
        return decode(frame)
    except ProtocolError as e:  # (the parser's words for a frame cut short may differ)
        return (type(e), e.code, getattr(e, "request_id", None))


@settings(max_examples=2000, deadline=None)
@given(near_frames)
def test_decode_should_read_a_bare_ok_as_json_does(frame):
    assert outcome_of(frame) == outcome_of(frame + b" ")


def test_decode_should_read_a_bare_ok_without_json():
    assert decode(b'{"t":"ok","id":7}') == Ok(id=7)
    assert decode(b'{"t":"ok","id":9223372036854775807}') == Ok(id=2**63 - 1)
    with pytest.raises(BadFrame):
        decode(b'{"t":"ok","id":07}')
    with pytest.raises(BadMessage):
        decode(b'{"t":"ok","id":9223372036854775808}')


@pytest.mark.parametrize(
    "frame",
    [
        b'{"t":"ping","id":01}',  # JSON forbids a leading zero
        b'{"t":"ping","id":-1}',
        b'{"t":"ping","id":9223372036854775808}',  # one over the largest id
        b'{"t":"ping","id":1,"x":2}',  # another field: decode() ignores it, but judges the frame
        b'{"t":"ping","id":1} ',
        b'{"t":"get","id":1,"key":"}',  # the key's opening quote is the closing one
        b'{"t":"get","id":1,"key":"a","x":"b"}',
        b'{"t":"get","id":1,"key":"a\\u0001"}',
        b'{"t":"get","id":1,"key":"a\x01"}',  # a raw control character: not JSON
        b'{"t":"get","id":1,"key":"\xc3\x28"}',  # not UTF-8
        b'{"t":"get","id":1,"key":"\xed\xa0\x80"}',  # an encoded surrogate
        b'{"t":"get","id":1,"key":"a\nb"}',  # two frames, neither of them a get
        b'{"t":"get","id":1,"key":"a\xffb"}',  # a RESYNC inside
        b'{"t":"ping","id":1\n2}',
    ],
)
def test_quick_request_should_leave_anything_unusual_to_decode(frame):
    assert quick_request(frame) is None


def test_quick_request_should_read_the_widest_ids_and_any_printable_key():
    assert quick_request(b'{"t":"ping","id":9223372036854775807}') == (_ID_MAX, None)
    assert quick_request(b'{"t":"ping","id":0}') == (0, None)
    assert quick_request(b'{"t":"get","id":7,"key":""}') == (7, "")
    assert quick_request('{"t":"get","id":7,"key":"clé €"}'.encode()) == (7, "clé €")


timestamps = st.one_of(st.floats(1.0, 4e9), st.sampled_from([0.0, 1.5, 1712345678.123456]))
values = st.one_of(st.text(max_size=200), st.sampled_from(["0123456789abcdef" * 512, '"\n\x00']))


@settings(max_examples=300, deadline=None)
@given(
    rid=ids,
    key=keys,
    value=values,
    ts=timestamps,
    origin=st.sampled_from(["host", "guest"]),
)
def test_encode_entry_should_write_what_encode_writes(rid, key, value, ts, origin):
    fields = {"id": rid, "key": key, "value": value, "ts": ts, "origin": origin}
    assert encode_entry("ok", rid, key, value, ts, origin) == encode(Ok(**fields))
    assert encode_entry("item", rid, key, value, ts, origin) == encode(Item(**fields))


def test_encode_entry_should_write_unusual_fields_as_encode_does():
    assert encode_entry("ok", 1, "k", "v", 1700000000, "host") == encode(
        Ok(id=1, key="k", value="v", ts=1700000000, origin="host")
    )
    with pytest.raises(ValueError):
        encode_entry("get", 1, "k", "v", 1.0, "host")
    with pytest.raises(TypeError):  # a lone surrogate, refused as encode() refuses it
        encode_entry("ok", 1, "k", "\ud800", 1.0, "host")


def test_entry_replies_should_write_what_encode_entry_writes_for_every_id():
    replies = EntryReplies()
    value = "0123456789abcdef" * 512
    for rid in (1, 2, 10**18, 0):
        assert replies.ok(rid, "k", value, 1.5, "host") == encode_entry(
            "ok", rid, "k", value, 1.5, "host"
        )
    assert 8192 < replies.size < 8400
    assert replies.ok(True, "k", value, 1.5, "host") == encode_entry(
        "ok", True, "k", value, 1.5, "host"
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda v, ts, o: ("".join(["0123456789abcdef" * 512]), ts, o),  # equal text, new object
        lambda v, ts, o: ("another value", ts, o),
        lambda v, ts, o: (v, ts + 1.0, o),
        lambda v, ts, o: (v, ts, "guest"),
    ],
)
def test_entry_replies_should_answer_a_changed_entry_with_its_new_fields(change):
    replies = EntryReplies()
    value, ts, origin = "".join(["0123456789abcdef" * 512]), 1.5, "host"
    replies.ok(1, "k", value, ts, origin)
    value, ts, origin = change(value, ts, origin)
    assert replies.ok(2, "k", value, ts, origin) == encode_entry("ok", 2, "k", value, ts, origin)


def test_entry_replies_should_keep_no_more_than_its_budget_and_forget_on_demand():
    replies = EntryReplies(budget=3000)
    for i in range(10):
        replies.ok(i, "k%d" % i, "v" * 1000, 1.0, "host")
        assert replies.size <= 3000
    assert replies.size > 2000  # the latest two are kept
    replies.forget("k9")
    assert replies.size < 2000
    replies.forget()
    assert replies.size == 0
    replies.ok(1, "big", "v" * 5000, 1.0, "host")  # over the budget alone: not kept
    assert replies.size == 0
