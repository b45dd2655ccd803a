"""Key and value limits at their edges, and the frame limit that the largest legal message fits
in."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto.codec import Reader, decode, encode
from ovmproto.framing import FrameDecoder
from ovmproto.limits import (
    FRAME_MAX,
    INVALID_KEY,
    INVALID_VALUE,
    KEY_MAX,
    KEY_TOO_LONG,
    VALUE_MAX,
    VALUE_TOO_LONG,
    check_key,
    check_value,
)
from ovmproto.messages import Changed, Item, Ok, PostEvent, Set

TOP = 2**63 - 1


def code_of(result):
    return None if result is None else result[0]


# ---- keys ----------------------------------------------------------------------------------


def test_a_key_of_exactly_the_limit_should_be_accepted():
    assert check_key("k" * KEY_MAX) is None
    assert check_key("é" * (KEY_MAX // 2)) is None  # 128 two-byte chars = 256 bytes
    assert check_key("€" * 85 + "a") is None  # 85 three-byte chars + 1 = 256 bytes
    assert check_key("\U0001f600" * 64) is None  # 64 four-byte chars = 256 bytes


@pytest.mark.parametrize(
    "key",
    [
        "k" * (KEY_MAX + 1),
        "é" * (KEY_MAX // 2) + "a",  # 257 bytes, only 129 characters
        "é" * (KEY_MAX // 2 + 1),
        "\U0001f600" * 64 + "a",
        "€" * 86,  # 258 bytes, 86 characters
    ],
)
def test_a_key_one_byte_or_more_over_the_limit_should_be_refused_with_its_size(key):
    code, reason = check_key(key)
    assert code == KEY_TOO_LONG
    size = len(key.encode("utf-8"))
    assert "%d bytes" % size in reason
    assert str(KEY_MAX) in reason
    assert "\n" not in reason


@pytest.mark.parametrize(
    "ch", ["=", "\x00", "\x01", "\n", "\t", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]
)
def test_a_key_holding_equals_or_a_control_character_should_be_refused(ch):
    for key in (ch, "a" + ch, ch + "b", "com.example." + ch + ".x"):
        code, reason = check_key(key)
        assert code == INVALID_KEY, repr(key)
        assert "\n" not in reason


@pytest.mark.parametrize(
    "ch", ["\x20", "\x7e", "\xa0", "\u2028", "\ufeff", "\U0001f600", '"', "\\"]
)
def test_a_key_holding_characters_next_to_the_control_ranges_should_be_accepted(ch):
    assert check_key("a" + ch + "b") is None


def test_an_empty_key_should_be_refused():
    assert code_of(check_key("")) == INVALID_KEY


@pytest.mark.parametrize("key", ["\ud800", "a\udfffb", "\udc80" * 3])
def test_a_key_with_a_lone_surrogate_should_be_refused(key):
    assert code_of(check_key(key)) == INVALID_KEY


@pytest.mark.parametrize("key", [None, 5, b"key", ["k"]])
def test_a_key_that_is_not_a_string_should_be_refused(key):
    assert code_of(check_key(key)) == INVALID_KEY


def test_the_event_key_and_dotted_names_should_be_legal_keys():
    assert check_key("VMAPIEvent") is None
    assert check_key("com.oracle.linux.network.ipaddr.0") is None
    assert check_key("com.oracle.linux.root-password") is None


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=300))
def test_check_key_should_agree_with_the_documented_rules(key):
    size = len(key.encode("utf-8"))
    forbidden = any(c == "=" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key)
    legal = 0 < size <= KEY_MAX and not forbidden
    assert (check_key(key) is None) == legal


# ---- values --------------------------------------------------------------------------------


def test_a_value_of_exactly_the_limit_should_be_accepted():
    assert check_value("v" * VALUE_MAX) is None
    assert check_value("é" * (VALUE_MAX // 2)) is None
    assert check_value("\x01" * VALUE_MAX) is None


@pytest.mark.parametrize("value", ["v" * (VALUE_MAX + 1), "é" * (VALUE_MAX // 2) + "a"])
def test_a_value_one_byte_over_the_limit_should_be_refused_with_its_size(value):
    code, reason = check_value(value)
    assert code == VALUE_TOO_LONG
    assert "%d bytes" % (VALUE_MAX + 1) in reason
    assert str(VALUE_MAX) in reason


@pytest.mark.parametrize(
    "value",
    [
        "",
        "=",
        "a=b",
        "\x00",
        "\x1f",
        "\x7f",
        "\x85",
        "\x9f",
        "line\nline",
        "\r\n\t",
        "\xff",
        "\ufffe",
    ],
)
def test_a_value_may_hold_equals_and_control_characters_and_be_empty(value):
    assert check_value(value) is None


@pytest.mark.parametrize("value", ["\ud800", "ok\udfff"])
def test_a_value_with_a_lone_surrogate_should_be_refused(value):
    assert code_of(check_value(value)) == INVALID_VALUE


@pytest.mark.parametrize("value", [None, 1, 1.5, b"v", ["v"], {"v": 1}])
def test_a_value_that_is_not_a_string_should_be_refused(value):
    assert code_of(check_value(value)) == INVALID_VALUE


def test_a_refusal_should_never_quote_the_value():
    secret = "Pa55w0rd-" + "x" * VALUE_MAX
    _code, reason = check_value(secret)
    assert "Pa55" not in reason


# ---- the frame limit -----------------------------------------------------------------------

WORST_KEY = '"' * KEY_MAX  # each byte escapes to 2
WORST_KEY_2 = "\\" * KEY_MAX
WORST_VALUE = "\x01" * VALUE_MAX  # each byte escapes to 6 (\u0001)


@pytest.mark.parametrize(
    "msg",
    [
        Set(id=TOP, key=WORST_KEY, value=WORST_VALUE, seq=TOP),
        Set(id=TOP, key=WORST_KEY_2, value="\x1f" * VALUE_MAX, seq=TOP),
        Ok(id=TOP, key=WORST_KEY, value=WORST_VALUE, ts=-1.7976931348623157e308, origin="guest"),
        Item(id=TOP, key=WORST_KEY, value=WORST_VALUE, ts=-2.2250738585072014e-308, origin="guest"),
        Changed(
            gseq=TOP,
            op="set",
            ts=1.7976931348623157e308,
            origin="guest",
            key=WORST_KEY,
            value=WORST_VALUE,
        ),
        PostEvent(id=TOP, value=WORST_VALUE),
    ],
    ids=lambda m: type(m).__name__,
)
def test_the_largest_legal_message_should_fit_in_one_frame(msg):
    assert check_key(getattr(msg, "key", "k")) is None
    assert check_value(msg.value) is None
    frame = encode(msg)
    assert len(frame) - 1 <= FRAME_MAX
    assert len(frame) > 6 * VALUE_MAX  # it really is escaped worst
    assert Reader().feed(frame) == [msg]


def test_no_single_character_should_escape_worse_than_the_limit_assumes():
    # FRAME_MAX assumes at most 6 bytes of JSON per byte of value (\u00XX). Check every BMP
    # character and a few astral ones against that, as the encoder really writes them.
    empty = len(encode(Ok(id=0, value="")))
    for o in list(range(0xD800)) + list(range(0xE000, 0x10000)) + [0x10000, 0x1F600, 0x10FFFF]:
        ch = chr(o)
        escaped = len(encode(Ok(id=0, value=ch))) - empty
        assert escaped <= 6 * len(ch.encode("utf-8")), hex(o)
        if check_key(ch) is None:
            assert escaped <= 2 * len(ch.encode("utf-8")), hex(o)


def test_a_frame_decoder_should_use_frame_max_by_default():
    assert FrameDecoder().max_frame == FRAME_MAX
    assert FRAME_MAX == 65536


def test_the_largest_legal_value_should_decode_back_exactly():
    msg = Set(id=1, key=WORST_KEY, value=WORST_VALUE, seq=1)
    assert decode(encode(msg)[:-1]).value == WORST_VALUE
