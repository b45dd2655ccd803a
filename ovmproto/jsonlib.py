"""JSON for the wire: orjson when it is installed, else the standard library, same bytes either way.

orjson is faster, but no distribution our guests run (Debian 11/12, Oracle Linux / RHEL 9) packages
it, and it costs ~2 MB of resident memory; a guest installed from a distribution package has only
the standard library. Both backends write the same compact UTF-8 for every message we send (only
floats far from a timestamp's magnitude may be spelled differently, with the same value) and refuse
the same inputs: NaN and infinities, lone surrogates, invalid UTF-8, and deep nesting (over 1,024
levels for orjson; over FALLBACK_NESTING_MAX for the fallback, whose parser recurses in C with
Python's recursion limit; no message of ours is more than 3 levels deep).

    dumps(obj) -> bytes        loads(bytes) -> object      JSONDecodeError (a ValueError)
    dumps_str(str) -> bytes    dumps_float(float) -> bytes  (dumps of one string or float, faster)
"""

from __future__ import annotations

TYPE_CHECKING = False  # mypy treats a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

FALLBACK_NESTING_MAX = 512  # well inside Python's recursion limit, whatever the caller's depth

# What either backend provides (orjson's functions take more options, which we never pass).
JSONDecodeError: type[ValueError]
dumps: Callable[[Any], bytes]
loads: Callable[[bytes | bytearray | memoryview | str], Any]
dumps_str: Callable[[str], bytes]
dumps_float: Callable[[float], bytes]

try:
    import orjson as _orjson
except ImportError:  # the standard library does the same job, more slowly
    BACKEND = "json"
else:
    BACKEND = "orjson"

if BACKEND == "orjson":
    JSONDecodeError = _orjson.JSONDecodeError
    dumps = _orjson.dumps
    loads = _orjson.loads
    dumps_str = dumps_float = _orjson.dumps
else:
    import json as _json
    import re as _re
    from math import isfinite as _isfinite

    # The fallback's own class where orjson has its own. The code is right, but mypy takes a class
    # statement for a name declared as a variable (above) as a redefinition.
    class JSONDecodeError(ValueError):  # type: ignore[no-redef]
        pass

    _encoder = _json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # An escaped surrogate (\\uD800-\\uDFFF) may be half of a valid pair, which json joins into one
    # character, or a lone one, which must be refused like invalid UTF-8.
    _SURROGATE_ESCAPE = _re.compile(rb"\\u[dD][89a-fA-F]")

    def dumps(obj: Any) -> bytes:
        try:
            return _encoder.encode(obj).encode("utf-8")
        except UnicodeEncodeError as e:  # a str holding a lone surrogate: orjson raises too
            raise TypeError("str is not valid UTF-8: surrogates not allowed") from e

    # What a JSON string must escape: control characters, the quote and the backslash, mapped to 0
    # (everything else to 1). Both backends write any other character as itself, in UTF-8, and no
    # byte of a multi-byte UTF-8 sequence is below 0x80.
    _MUST_ESCAPE = bytes(0 if b < 0x20 or b in (0x22, 0x5C) else 1 for b in range(256))

    def dumps_str(s: str) -> bytes:
        """dumps(s) for one string. A value with nothing to escape (the common case) costs a
        bytes scan, ~5 µs for 8 KiB where the encoder takes ~18 µs (it reads each character
        twice, through the Unicode API)."""
        try:
            data = s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: dumps refuses it, as orjson does
            return dumps(s)
        if data.translate(_MUST_ESCAPE).find(0) < 0:
            return b'"' + data + b'"'
        return dumps(s)

    _float_repr = float.__repr__

    def dumps_float(x: float) -> bytes:
        """dumps(x) for one float: what the encoder writes, float.__repr__, without building
        its iterator for one number (NaN and infinities, refused by dumps, go through it)."""
        if type(x) is float and _isfinite(x):
            return _float_repr(x).encode("ascii")
        return dumps(x)

    def _refuse_constant(name: str) -> NoReturn:
        raise ValueError("%s is not valid JSON" % name)

    # Built once: json.loads(text, parse_constant=...) would build a decoder at every call.
    _decode = _json.JSONDecoder(parse_constant=_refuse_constant).decode

    def _depth_ok(data: bytes) -> bool:
        depth = 0
        in_string = escaped = False
        for b in data:
            if in_string:
                if escaped:
                    escaped = False
                elif b == 0x5C:  # backslash
                    escaped = True
                elif b == 0x22:
                    in_string = False
            elif b == 0x22:
                in_string = True
            elif b in (0x5B, 0x7B):  # [ {
                depth += 1
                if depth > FALLBACK_NESTING_MAX:
                    return False
            elif b in (0x5D, 0x7D):
                depth -= 1
        return True

    def _all_strings_utf8(obj: Any) -> None:
        stack = [obj]
        while stack:
            o = stack.pop()
            if isinstance(o, str):
                o.encode("utf-8")
            elif isinstance(o, list):
                stack.extend(o)
            elif isinstance(o, dict):
                stack.extend(o.keys())
                stack.extend(o.values())

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise JSONDecodeError("str is not valid UTF-8: %s" % e.reason) from None
        else:
            text = data
        if text.count("[") + text.count("{") > FALLBACK_NESTING_MAX and not _depth_ok(
            text.encode("utf-8", "surrogatepass")
        ):
            raise JSONDecodeError("recursion limit reached")
        try:
            obj = _decode(text)
        except (ValueError, RecursionError) as e:
            raise JSONDecodeError(str(e).splitlines()[0] if str(e) else "invalid JSON") from None
        if "\\u" in text and _SURROGATE_ESCAPE.search(text.encode("utf-8")):
            try:
                _all_strings_utf8(obj)
            except UnicodeEncodeError:
                raise JSONDecodeError("str is not valid UTF-8: surrogates not allowed") from None
        return obj
