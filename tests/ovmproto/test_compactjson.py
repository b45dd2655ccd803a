"""ovmproto.compactjson must give exactly what the json package gives, without importing it."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto import compactjson

text = st.text(max_size=30)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | text
    | st.floats(allow_nan=False, allow_infinity=False)
)
flat = st.dictionaries(text, scalars, max_size=8)
nested = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def reference(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=400, deadline=None)
@given(nested)
def test_dumps_should_equal_json(obj):
    assert compactjson.dumps(obj) == reference(obj)


@settings(max_examples=400, deadline=None)
@given(flat)
def test_loads_should_equal_json_for_the_daemons_flat_replies(obj):
    data = reference(obj).encode("utf-8")
    assert compactjson.loads(data) == json.loads(data)
    assert compactjson._flat_object(data.decode()) is not None  # taken without the json package


@settings(max_examples=200, deadline=None)
@given(nested)
def test_loads_should_equal_json_for_anything_else_too(obj):
    data = json.dumps(obj).encode("utf-8")  # with spaces, \\u escapes: the fallback's business
    assert compactjson.loads(data) == json.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b'{"a":}',
        b'{"a":01}',
        b'{"a":1.}',
        b'{"a":.5}',
        b'{"a":1e}',
        b'{"a":+1}',
        b'{"a":-}',
        b'{"a":1e+}',
        b'{"a":tru}',
        b'{"a":"x"',
        b'{"a":"x"}x',
        b'{"a":"\\q"}',
        b"\xff",
        b'{"a":"\x01"}',
        b'{"a":1,}',
        b"{,}",
    ],
)
def test_loads_should_refuse_what_json_refuses(data):
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        compactjson.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1e5}',
        b'{"a":-0.5E-3}',
        b'{"a":0}',
        b'{"a":-0}',
        b"{}",
        b'{"a":"\\u00e9\\ud83d\\ude00"}',
        b'{"a":1E+2}',
    ],
)
def test_loads_should_read_every_number_and_escape_json_reads(data):
    assert compactjson.loads(data) == json.loads(data)


def test_the_cli_hot_path_should_not_import_json_or_re():
    # A request as the CLI sends it, and a reply as the daemon writes it (compact, a float ts).
    code = (
        "import sys; from ovmproto import compactjson as c; "
        "c.dumps({'t': 'get', 'id': 1, 'key': 'k\\u00e9'}); "
        "c.dumps({'t': 'put', 'id': 2, 'items': [['a', 'b=c']]}); "
        'r = c.loads(b\'{"t":"ok","id":1,"value":"v\\\\n","ts":1763.25,\''
        "            b'\"origin\":\"host\"}'); assert r['ts'] == 1763.25, r; "
        "print(sorted(m for m in ('json', 're', 'enum') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=__file__.rsplit("/tests/", 1)[0],
    )
    assert out.stdout.strip() == "[]", out.stderr
