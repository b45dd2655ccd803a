"""Messages: every type round-trips, fields are type-checked, unknown fields ignored, values
hidden."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto.codec import decode, encode
from ovmproto.errors import BadMessage
from ovmproto.messages import (
    BOOL,
    INT,
    ITEMS,
    MESSAGE_TYPES,
    NUM,
    REQUEST_TYPES,
    STR,
    Changed,
    Clear,
    Delete,
    Err,
    Events,
    Get,
    Hello,
    Item,
    List,
    Message,
    Ok,
    Ping,
    PostEvent,
    Put,
    Set,
    Wait,
    _message,
)

SECRET = "s3cr3t-Pa55w0rd"

_INT_MAX = 2**63 - 1
_KIND_STRATEGIES = {
    INT: st.integers(min_value=0, max_value=_INT_MAX),
    STR: st.text(max_size=50),
    BOOL: st.booleans(),
    NUM: st.one_of(
        st.integers(min_value=-_INT_MAX, max_value=_INT_MAX),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    ITEMS: st.lists(st.lists(st.text(max_size=20), min_size=2, max_size=2), max_size=5),
}


def message_of(cls):
    """Instances of ``cls`` with every required field and any subset of the optional ones."""
    fields = {name: _KIND_STRATEGIES[kind] for name, kind in cls.REQUIRED}
    optional = {name: st.one_of(st.none(), _KIND_STRATEGIES[kind]) for name, kind in cls.OPTIONAL}
    return st.fixed_dictionaries(fields, optional=optional).map(lambda f: cls(**f))


any_message = st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)).flatmap(
    message_of
)


def roundtrip(msg):
    frame = encode(msg)
    assert frame.endswith(b"\n")
    return decode(frame[:-1])


def test_the_table_should_hold_every_type_of_the_protocol_once():
    assert sorted(MESSAGE_TYPES) == sorted(
        [
            "hello",
            "ping",
            "set",
            "del",
            "get",
            "list",
            "put",
            "clear",
            "wait",
            "events",
            "event",
            "ok",
            "err",
            "item",
            "changed",
        ]
    )
    assert all(cls.TYPE == t for t, cls in MESSAGE_TYPES.items())
    assert REQUEST_TYPES == set(MESSAGE_TYPES) - {"ok", "err", "item", "changed"}


@settings(max_examples=300, deadline=None)
@given(msg=any_message)
def test_every_message_type_should_round_trip(msg):
    back = roundtrip(msg)
    assert type(back) is type(msg)
    assert back == msg
    assert back.to_wire() == msg.to_wire()


@pytest.mark.parametrize(
    "msg",
    [
        Hello(id=1, v=1, nonce="ab12", epoch="e"),
        Hello(id=1, v=1, nonce="ab12"),
        Ping(id=0),
        Set(id=2, key="k", value="v", seq=9),
        Set(id=2, key="k", value=""),
        Delete(id=3, key="k", seq=1),
        Delete(id=3, key="k"),
        Get(id=4, key="k"),
        List(id=5),
        Put(id=6, items=[["a", "1"], ["b", "2"]]),
        Put(id=6, items=[]),
        Clear(id=7),
        Wait(id=8, key="k", changed=True, timeout=2.5),
        Wait(id=8, key="k", timeout=3),
        Events(id=9),
        PostEvent(id=10, value="reboot"),
        Ok(id=11, v=1, nonce="n", agent="ovmd 0.1.0", gid="g", gseq=4, epoch="e", hseq=2),
        Ok(id=12, seq=3, dup=True),
        Ok(id=13, found=False),
        Ok(id=14, key="k", value="v", ts=1700000000.25, origin="host"),
        Ok(id=15, count=0),
        Err(code="not_found", msg="no such key"),
        Err(id=16, code="quota", msg="full"),
        Item(id=17, key="k", value="v", ts=1.0, origin="guest"),
        Changed(gseq=18, op="set", ts=2.0, origin="guest", key="k", value="v"),
        Changed(gseq=19, op="clear", ts=2.0, origin="host"),
    ],
    ids=repr,
)
def test_each_documented_message_should_round_trip(msg):
    assert roundtrip(msg) == msg


def test_absent_optional_fields_should_not_be_written():
    assert encode(Err(code="bad_frame", msg="x")) == b'{"t":"err","code":"bad_frame","msg":"x"}\n'
    assert encode(Ok(id=1)) == b'{"t":"ok","id":1}\n'


def test_unknown_fields_should_be_ignored():
    msg = decode(b'{"t":"set","id":1,"key":"k","value":"v","newer":{"a":[1,2]},"x":null,"seq":4}')
    assert msg == Set(id=1, key="k", value="v", seq=4)
    assert decode(b'{"v2only":true,"id":3,"t":"ping"}') == Ping(id=3)


def test_null_should_count_as_absent():
    assert decode(b'{"t":"set","id":1,"key":"k","value":"v","seq":null}') == Set(
        id=1, key="k", value="v"
    )
    with pytest.raises(BadMessage) as info:
        decode(b'{"t":"set","id":1,"key":null,"value":"v"}')
    assert "missing" in info.value.message


def bad(frame):
    with pytest.raises(BadMessage) as info:
        decode(frame)
    assert info.value.code == "bad_request"
    return info.value


@pytest.mark.parametrize(
    "frame, field",
    [
        (b'{"t":"ping","id":true}', "id"),  # bool where int
        (b'{"t":"ping","id":false}', "id"),
        (b'{"t":"ping","id":-1}', "id"),  # negative id
        (b'{"t":"ping","id":1.0}', "id"),  # float id, even integral
        (b'{"t":"ping","id":"1"}', "id"),
        (b'{"t":"ping","id":9223372036854775808}', "id"),  # 2**63
        (b'{"t":"ping","id":18446744073709551615}', "id"),  # 2**64 - 1
        (b'{"t":"ping","id":18446744073709551616}', "id"),  # 2**64
        (b'{"t":"ping","id":123456789012345678901234567890}', "id"),
        (b'{"t":"set","id":1,"key":"k","value":"v","seq":"5"}', "seq"),  # string seq
        (b'{"t":"set","id":1,"key":"k","value":"v","seq":true}', "seq"),
        (b'{"t":"set","id":1,"key":"k","value":"v","seq":9223372036854775808}', "seq"),
        (b'{"t":"set","id":1,"key":"k","value":5}', "value"),
        (b'{"t":"set","id":1,"key":["k"],"value":"v"}', "key"),
        (b'{"t":"set","id":1,"key":"k"}', "value"),
        (b'{"t":"hello","id":1,"v":"1","nonce":"n"}', "v"),
        (b'{"t":"hello","id":1,"v":1,"nonce":7}', "nonce"),
        (b'{"t":"wait","id":1,"key":"k","changed":1}', "changed"),  # int where bool
        (b'{"t":"wait","id":1,"key":"k","timeout":"5"}', "timeout"),
        (b'{"t":"wait","id":1,"key":"k","timeout":true}', "timeout"),
        (b'{"t":"wait","id":1,"key":"k","timeout":9223372036854775808}', "timeout"),
        (b'{"t":"put","id":1,"items":[["a"]]}', "items"),
        (b'{"t":"put","id":1,"items":[["a","b","c"]]}', "items"),
        (b'{"t":"put","id":1,"items":[["a",1]]}', "items"),
        (b'{"t":"put","id":1,"items":{"a":"b"}}', "items"),
        (b'{"t":"ok","id":1,"dup":0}', "dup"),
        (b'{"t":"item","id":1,"key":"k","value":"v","ts":"now","origin":"host"}', "ts"),
        (b'{"t":"changed","gseq":-5,"op":"set","ts":1,"origin":"host"}', "gseq"),
        (b'{"t":"err","code":404,"msg":"x"}', "code"),
    ],
)
def test_a_field_of_the_wrong_type_should_be_a_bad_request_naming_it(frame, field):
    err = bad(frame)
    assert repr(field) in err.message


def test_a_bad_request_should_carry_the_id_only_when_it_is_usable():
    assert bad(b'{"t":"set","id":12,"key":"k","value":5}').request_id == 12
    assert bad(b'{"t":"set","id":12,"key":"k"}').request_id == 12
    assert bad(b'{"t":"set","id":-12,"key":"k","value":"v"}').request_id is None
    assert bad(b'{"t":"set","id":true,"key":"k","value":"v"}').request_id is None
    assert bad(b'{"t":"set","id":9223372036854775808,"key":"k","value":"v"}').request_id is None


def test_the_widest_integers_should_be_accepted():
    top = 2**63 - 1
    assert decode(b'{"t":"set","id":%d,"key":"k","value":"v","seq":%d}' % (top, top)) == Set(
        id=top, key="k", value="v", seq=top
    )
    assert decode(b'{"t":"wait","id":0,"key":"k","timeout":-%d}' % top).timeout == -top
    assert (
        decode(b'{"t":"item","id":0,"key":"k","value":"v","ts":1e308,"origin":"host"}').ts == 1e308
    )


# ---- repr never shows a value ----------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Set(id=1, key="root-password", value=SECRET, seq=1),
        Put(id=2, items=[["root-password", SECRET], ["user", SECRET]]),
        Ok(id=3, key="root-password", value=SECRET, ts=1.0, origin="host"),
        Item(id=4, key="root-password", value=SECRET, ts=1.0, origin="host"),
        Changed(gseq=5, op="set", ts=1.0, origin="host", key="root-password", value=SECRET),
        PostEvent(id=6, value=SECRET),
    ],
    ids=lambda m: type(m).__name__,
)
def test_repr_should_never_show_a_value(msg):
    text = repr(msg)
    assert SECRET not in text
    assert SECRET[:4] not in text
    assert "%s(" % type(msg).__name__ in text


def test_repr_should_show_the_size_of_a_value_in_bytes_and_the_number_of_pairs():
    assert repr(Set(id=1, key="k", value="é" * 10)) == "Set(id=1, key='k', value=<20 bytes>)"
    assert repr(Put(id=2, items=[["a", SECRET]] * 3)) == "Put(id=2, items=<3 pairs>)"
    assert repr(Changed(gseq=1, op="clear", ts=1.5, origin="guest")) == (
        "Changed(gseq=1, op='clear', ts=1.5, origin='guest')"
    )


@settings(max_examples=200, deadline=None)
@given(value=st.text(), items=st.lists(st.lists(st.text(), min_size=2, max_size=2)))
def test_repr_should_show_only_the_size_of_any_value(value, items):
    size = len(value.encode("utf-8"))
    assert repr(Item(id=1, key="k", value=value, ts=0.5, origin="guest")) == (
        "Item(id=1, key='k', value=<%d bytes>, ts=0.5, origin='guest')" % size
    )
    assert repr(Put(id=1, items=items)) == "Put(id=1, items=<%d pairs>)" % len(items)


def test_messages_should_compare_by_type_and_fields():
    assert Ping(id=1) == Ping(id=1)
    assert Ping(id=1) != Ping(id=2)
    assert Clear(id=1) != Ping(id=1)
    assert Set(id=1, key="k", value="v") != Set(id=1, key="k", value="v", seq=1)
    with pytest.raises(TypeError):
        hash(Ping(id=1))


def test_constructing_with_an_unknown_field_should_be_a_type_error():
    with pytest.raises(TypeError):
        Ping(id=1, colour="blue")


# ---- how a message type is declared -------------------------------------------------------


def test_every_message_type_should_keep_its_fields_in_slots_and_no_instance_dict():
    for cls in MESSAGE_TYPES.values():
        assert cls.__slots__ == tuple(n for n, _ in cls.REQUIRED + cls.OPTIONAL)
        msg = cls(**{name: None for name, _ in cls.REQUIRED})
        assert not hasattr(msg, "__dict__")


def define(*fields):
    """A message type ``Odd`` declared, as in ovmproto.messages, with these field lines."""
    namespace = {"_message": _message, "Message": Message}
    body = "".join("    %s\n" % line for line in fields)
    exec(
        "from __future__ import annotations\n@_message\nclass Odd(Message):\n    TYPE = 'odd'\n"
        + body,
        namespace,
    )
    return namespace["Odd"]


@pytest.mark.parametrize(
    "field",
    [
        "x: int = 3",  # a required field with a default
        "x: int | None",  # an optional field without its `= None`
        "x: int | None = 0",  # an optional field whose default is not None
        "x: dict",  # no such kind
        "x: str | None = None",  # no required field at all
        "_x: int",  # the compiled methods' own names start with "_"
        "pass",
    ],
)
def test_a_message_type_with_a_malformed_field_should_be_refused_when_defined(field):
    with pytest.raises(TypeError):
        define(field)


def test_a_message_type_should_take_its_fields_in_order_required_then_optional():
    odd = define("a: int", "b: float | None = None", "c: list[list[str]]")
    assert odd.REQUIRED == (("a", INT), ("c", ITEMS))
    assert odd.OPTIONAL == (("b", NUM),)
    assert encode(odd(c=[["k", "v"]], a=1)) == b'{"t":"odd","a":1,"c":[["k","v"]]}\n'


# ---- the compiled methods do what Message's own do ----------------------------------------


_GENERIC_FROM_WIRE = vars(Message)["from_wire"].__func__

# Anything a field may hold once decoded: each kind, the values at the edges of each kind, and
# the wrong kinds.
_EDGES = [None, True, False, 0, 1, -1, _INT_MAX, _INT_MAX + 1, -_INT_MAX, -_INT_MAX - 1]
_EDGES += [0.0, -0.0, 1.5, -2.5, 1e308, "", "x", [], [["a", "b"]], [["a"]], [["a", 1]], {}]
_wire_value = st.one_of(
    st.sampled_from(_EDGES),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=3),
)


def wire_object_of(cls):
    """Decoded JSON objects for ``cls``: each of its fields absent or any value, and a stray one."""
    names = [n for n, _ in cls.REQUIRED + cls.OPTIONAL] + ["stray"]
    good = message_of(cls).map(lambda m: m.to_wire())
    anything = st.fixed_dictionaries({}, optional=dict.fromkeys(names, _wire_value))
    # Mostly well-formed objects with a field or two changed, so both paths get exercised.
    mutated = st.tuples(good, anything).map(lambda p: {**p[0], **p[1]})
    return st.one_of(good, mutated, anything).map(lambda o: {**o, "t": cls.TYPE})


def outcome(build):
    try:
        msg = build()
    except BadMessage as e:
        return ("refused", e.message, e.request_id, e.code)
    return ("built", type(msg), [getattr(msg, n) for n in msg.__slots__])


@pytest.mark.parametrize(
    "cls", sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE), ids=lambda c: c.__name__
)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_compiled_from_wire_should_accept_and_refuse_what_the_generic_one_does(cls, data):
    obj = data.draw(wire_object_of(cls))
    assert outcome(lambda: cls.from_wire(obj, b"raw")) == outcome(
        lambda: _GENERIC_FROM_WIRE(cls, obj, b"raw")
    )


@settings(max_examples=300, deadline=None)
@given(any_message)
def test_the_compiled_init_and_to_wire_should_do_what_the_generic_ones_do(msg):
    fields = {n: getattr(msg, n) for n in msg.__slots__ if getattr(msg, n) is not None}
    fields.update({n: getattr(msg, n) for n, _ in msg.REQUIRED})
    generic = object.__new__(type(msg))
    Message.__init__(generic, **fields)
    assert type(msg)(**fields) == generic
    assert list(msg.to_wire().items()) == list(Message.to_wire(msg).items())  # in the same order


def test_a_missing_field_or_a_positional_argument_should_be_a_type_error():
    with pytest.raises(TypeError):
        Set(id=1, key="k")
    with pytest.raises(TypeError):
        Ping(1)
