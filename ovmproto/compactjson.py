"""Compact JSON for the CLIs' hot paths (ovmd, vmmessage), without importing the json package.

`import json` pulls in re and enum: ~7 ms at every `ovmd -g` or `vmmessage query`, against a
~12 ms interpreter start, and scripts call them in loops. The CLIs write small flat objects and
read flat replies (the daemon's frames, the bridge API's answers), so the C accelerator _json
(always built with CPython) does the string work here.
Anything this module does not recognise is handed to the json package, imported only then: the
result is always exactly what json would give, errors included (a ValueError).
"""

TYPE_CHECKING = False  # mypy treats a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from typing import Any

try:
    from _json import encode_basestring as _quote
    from _json import scanstring as _scanstring

    _ACCELERATED = True
except ImportError:  # an interpreter without the accelerator: the json package does it all
    _ACCELERATED = False


class _Unsupported(Exception):
    pass


def dumps(obj: object) -> str:
    """What json.dumps(obj, ensure_ascii=False, separators=(",", ":")) returns."""
    if _ACCELERATED:
        try:
            return "".join(_dump(obj, []))
        except _Unsupported:
            pass
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _dump(obj: "Any", out: "list[str]") -> "list[str]":
    t = type(obj)
    if t is str:
        out.append(_quote(obj))
    elif obj is None:
        out.append("null")
    elif t is bool:
        out.append("true" if obj else "false")
    elif t is int:
        out.append(int.__repr__(obj))
    elif t is dict:
        out.append("{")
        for i, (k, v) in enumerate(obj.items()):
            if type(k) is not str:
                raise _Unsupported()
            if i:
                out.append(",")
            out.append(_quote(k))
            out.append(":")
            _dump(v, out)
        out.append("}")
    elif t is list or t is tuple:
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _dump(v, out)
        out.append("]")
    else:  # floats (json's spelling of specials), subclasses, anything else: json decides
        raise _Unsupported()
    return out


def loads(data: "bytes | bytearray | str") -> "Any":
    """What json.loads(data) returns for ``data`` (bytes of UTF-8, or str)."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if _ACCELERATED:
        obj = _flat_object(text)
        if obj is not None:
            return obj
    import json

    return json.loads(text)


_LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_NUMBER_CHARS = frozenset("-+.eE0123456789")


def _flat_object(text: str) -> "dict[str, Any] | None":
    """A compact JSON object whose values are strings, numbers, true, false or null; else None."""
    value: str | int | float | bool | None
    try:
        if text[:1] != "{":
            return None
        out: dict[str, Any] = {}
        i = 1
        if text[i] == "}":
            return out if len(text) == 2 else None
        while True:
            if text[i] != '"':
                return None
            key, i = _scanstring(text, i + 1, True)
            if text[i] != ":":
                return None
            i += 1
            c = text[i]
            if c == '"':
                value, i = _scanstring(text, i + 1, True)
            elif c in _LITERALS:
                word, value = _LITERALS[c]
                if not text.startswith(word, i):
                    return None
                i += len(word)
            else:
                j = i
                while j < len(text) and text[j] in _NUMBER_CHARS:
                    j += 1
                value = _number(text[i:j])
                i = j
            out[key] = value
            c = text[i]
            i += 1
            if c == "}":
                return out if i == len(text) else None
            if c != ",":
                return None
    except (ValueError, IndexError):
        return None  # json gives the answer, or the precise error


def _number(tok: str) -> "int | float":
    """A JSON number token as json reads it; ValueError for anything JSON does not allow."""
    body = tok[1:] if tok[:1] == "-" else tok
    mantissa, e, exponent = body.replace("E", "e").partition("e")
    whole, dot, fraction = mantissa.partition(".")
    if not whole.isdigit() or (len(whole) > 1 and whole[0] == "0"):
        raise ValueError(tok)
    if dot and not fraction.isdigit():
        raise ValueError(tok)
    if (e and not exponent.lstrip("+-").isdigit()) or exponent[1:2] in ("+", "-"):
        raise ValueError(tok)
    return float(tok) if (dot or e) else int(tok)
