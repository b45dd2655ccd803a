"""The standard-library fallback of ovmproto.jsonlib must write and refuse exactly what orjson
does."""

import importlib.util
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto import jsonlib


def load_fallback():
    """A second copy of the module, imported while orjson is unimportable."""
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # makes `import orjson` raise ImportError
    try:
        spec = importlib.util.spec_from_file_location("jsonlib_fallback", jsonlib.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.modules["orjson"] = saved
    return module


fallback = load_fallback()

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | texts
    | st.floats(1.0, 4e9, allow_nan=False)
)  # timestamps: the only floats we send
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)


def test_the_fallback_should_be_in_use_without_orjson_and_orjson_with_it():
    assert fallback.BACKEND == "json" and jsonlib.BACKEND == "orjson"


@settings(max_examples=300, deadline=None)
@given(documents)
def test_it_should_write_the_same_bytes_as_orjson(doc):
    assert fallback.dumps(doc) == orjson.dumps(doc)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_it_should_read_back_what_orjson_reads(doc):
    data = orjson.dumps(doc)
    assert fallback.loads(data) == orjson.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"NaN",
        b"[Infinity]",
        b"-Infinity",
        b'"\\ud800"',
        b'{"k":"\\udfff"}',
        b'"\xff"',
        b'"\xc3\x28"',
        b'"\xed\xa0\x80"',
        b"[" * 100_000,
        b'{"a":' * 5000,
        b"[" * 1025 + b"]" * 1025,
        b"",
        b"{",
        b"[1,]",
        b"'x'",
        b"01",
    ],
)
def test_it_should_refuse_what_orjson_refuses(data):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data)
    with pytest.raises(fallback.JSONDecodeError):
        fallback.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'"\\ud83d\\ude00"',
        b"[" * 512 + b"]" * 512,
        b'"[[[[' + b"[" * 2000 + b'"',
        b'{"t":"set","id":1,"key":"k","value":"\\u0000\\n\\""}',
    ],
)
def test_it_should_accept_what_orjson_accepts(data):
    assert fallback.loads(data) == orjson.loads(data)


def test_the_fallback_should_refuse_nesting_over_its_limit_without_recursion_error():
    deep = b"[" * (fallback.FALLBACK_NESTING_MAX + 1) + b"]" * (fallback.FALLBACK_NESTING_MAX + 1)
    with pytest.raises(fallback.JSONDecodeError):
        fallback.loads(deep)


def test_it_should_refuse_to_write_a_lone_surrogate_like_orjson():
    with pytest.raises(TypeError):
        orjson.dumps("\ud800")
    with pytest.raises(TypeError):
        fallback.dumps("\ud800")


# Strings as values come: mostly plain, some with what JSON escapes (control characters, the quote,
# the backslash), some beyond ASCII.
plain_or_not = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=300),
    st.sampled_from(["", '"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "é\n", "€" * 3000]),
)


@settings(max_examples=500, deadline=None)
@given(plain_or_not)
def test_dumps_str_should_write_what_dumps_writes_in_both_backends(s):
    assert fallback.dumps_str(s) == fallback.dumps(s) == orjson.dumps(s)
    assert jsonlib.dumps_str(s) == orjson.dumps(s)


def test_dumps_str_should_refuse_a_lone_surrogate_like_dumps():
    with pytest.raises(TypeError):
        fallback.dumps_str("ok\ud800")


@settings(max_examples=300, deadline=None)
@given(st.floats(1.0, 4e9) | st.integers(-(2**63), 2**63 - 1))
def test_dumps_float_should_write_what_dumps_writes_for_timestamps(x):
    assert fallback.dumps_float(x) == fallback.dumps(x) == orjson.dumps(x)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_dumps_float_should_write_what_the_fallback_dumps_writes_for_any_float(x):
    assert fallback.dumps_float(x) == fallback.dumps(x)


@pytest.mark.parametrize("x", [float("nan"), float("inf"), -float("inf")])
def test_dumps_float_should_refuse_what_dumps_refuses(x):
    with pytest.raises(ValueError):
        fallback.dumps(x)
    with pytest.raises(ValueError):
        fallback.dumps_float(x)
