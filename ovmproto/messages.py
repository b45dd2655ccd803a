"""Typed messages and their mapping to and from the wire's JSON objects.

Every frame is a JSON object whose "t" names its type. Requests carry an "id" that the reply
("ok", "err" or a stream of "item" then "ok") echoes. Unknown fields are ignored (a newer peer may
send more); a known field of the wrong type is a BadMessage. docs/protocol.md is the prose of this.

Values may be secrets: ``repr()`` of a message never shows a value, only its size.
"""

from __future__ import annotations

import math

from .errors import BadMessage

TYPE_CHECKING = False  # mypy treats a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, TypeVar, final

    from typing_extensions import Self, dataclass_transform  # in typing from Python 3.11

    Kind = Callable[[object], bool]  # a field kind: True when a decoded JSON value is acceptable
    Field = tuple[str, Kind]
    _M = TypeVar("_M", bound="Message")
else:

    def dataclass_transform(**_options: object) -> Callable[[object], object]:
        """Only a mark for type checkers (typing has none on Python 3.9)."""
        return lambda decorator: decorator

    def final(cls: type) -> type:
        """Only a mark for type checkers, without importing typing."""
        return cls


# Field kinds: each checker returns True when the decoded JSON value is acceptable. Integers
# exclude bool (JSON true is not 1) and stay within 63 bits.
_INT_MAX = (1 << 63) - 1


def _is_int(v: object) -> bool:
    return type(v) is int and 0 <= v <= _INT_MAX


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_bool(v: object) -> bool:
    return type(v) is bool


def _is_num(v: object) -> bool:
    return (type(v) is int and abs(v) <= _INT_MAX) or (type(v) is float and math.isfinite(v))


def _is_items(v: object) -> bool:
    return type(v) is list and all(
        type(p) is list and len(p) == 2 and type(p[0]) is str and type(p[1]) is str for p in v
    )


INT, STR, BOOL, NUM, ITEMS = _is_int, _is_str, _is_bool, _is_num, _is_items
_KIND_NAMES: dict[Kind, str] = {
    _is_int: "an integer",
    _is_str: "a string",
    _is_bool: "a boolean",
    _is_num: "a number",
    _is_items: "a list of [key, value] pairs",
}
# How the message classes below spell each kind in their annotations (a number is annotated float:
# to a type checker an int is a float too).
_KIND_OF_ANNOTATION: dict[str, Kind] = {
    "int": INT,
    "str": STR,
    "bool": BOOL,
    "float": NUM,
    "list[list[str]]": ITEMS,
}
_OPTIONAL_SUFFIX = " | None"

# Fields whose content may be secret: repr shows their size only.
_SECRET = frozenset(("value", "items"))

ORIGIN_HOST = "host"
ORIGIN_GUEST = "guest"
ORIGINS = (ORIGIN_HOST, ORIGIN_GUEST)

OP_SET = "set"
OP_DEL = "del"
OP_CLEAR = "clear"
CHANGE_OPS = (OP_SET, OP_DEL, OP_CLEAR)


def _secret_size(v: str | list[list[str]]) -> int:
    """The size repr shows: UTF-8 bytes of a string (the unit of the limits), else its length."""
    if type(v) is str:
        return len(v.encode("utf-8", "surrogatepass"))
    return len(v)


@dataclass_transform(kw_only_default=True)
def _message(cls: type[_M]) -> type[_M]:
    """Make ``cls`` a message type from its annotated fields, in the order the wire writes them:
    ``name: T`` is a required field, ``name: T | None = None`` an optional one, T one of
    _KIND_OF_ANNOTATION. Type checkers read the same annotations (dataclass_transform): typed
    fields, keyword-only constructors.

    The fields become REQUIRED, OPTIONAL and __slots__ (instances stay small, attribute access
    fast). Slots exist only from a class's creation, so this creates the class again from its
    namespace, minus the defaults, which would clash with the slots (__init__ and from_wire supply
    None). A decorator rather than a metaclass: CPython (3.11 to 3.13) does not specialise the
    lookup of a class attribute when the class's metaclass is not type, and from_wire looks up
    REQUIRED and OPTIONAL for every frame. The type also gets its own __init__, to_wire and
    from_wire, compiled from its fields (_compiled).
    """
    name = cls.__name__
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    required: list[Field] = []
    optional: list[Field] = []
    for field, annotation in namespace.get("__annotations__", {}).items():
        if type(annotation) is not str:
            raise TypeError(
                "%s.%s: define messages under `from __future__ import annotations`" % (name, field)
            )
        is_optional = annotation.endswith(_OPTIONAL_SUFFIX)
        kind = _KIND_OF_ANNOTATION.get(
            annotation[: -len(_OPTIONAL_SUFFIX)] if is_optional else annotation
        )
        if is_optional:
            well_formed = namespace.pop(field, False) is None
        else:
            well_formed = field not in namespace
        if kind is None or not well_formed:
            raise TypeError(
                "%s.%s: a field is `name: T` or `name: T | None = None`, T one of %s"
                % (name, field, ", ".join(_KIND_OF_ANNOTATION))
            )
        (optional if is_optional else required).append((field, kind))
    if not required:
        raise TypeError("%s: a message type needs at least one required field" % name)
    namespace["__slots__"] = tuple(n for n, _ in required + optional)
    namespace["__qualname__"] = cls.__qualname__
    namespace["REQUIRED"] = tuple(required)
    namespace["OPTIONAL"] = tuple(optional)
    namespace.update(_compiled(name, cls.TYPE, required, optional))
    return type(name, cls.__bases__, namespace)


# How the compiled from_wire tests the commonest kinds inline ({} is the value); other kinds are
# called.
_INLINE_KIND: dict[Kind, str] = {
    _is_int: "type({0}) is int and 0 <= {0} <= _INT_MAX",
    _is_str: "type({0}) is str",
    _is_bool: "type({0}) is bool",
}


def _compiled(name: str, t: str, required: list[Field], optional: list[Field]) -> dict[str, Any]:
    """__init__, to_wire and from_wire for one message type, as straight-line code: what Message's
    own (the reference) do, looping over the fields with getattr and setattr, at half the cost or
    less (every frame sent or received goes through them). A frame that from_wire would refuse
    goes to Message.from_wire, which raises the BadMessage naming its first bad field."""
    for field, _ in required + optional:
        if field.startswith("_"):  # the compiled code's own names start with one
            raise TypeError("%s.%s: a field name must not start with '_'" % (name, field))
    scope: dict[str, Any] = {"_new": object.__new__, "_INT_MAX": _INT_MAX, "_refuse": _refuse}
    params = [n for n, _ in required] + ["%s=None" % n for n, _ in optional]
    lines = ["def __init__(_self, *, %s):" % ", ".join(params)]
    lines += ["    _self.%s = %s" % (n, n) for n, _ in required + optional]
    lines.append(
        "def to_wire(_self):\n    _obj = {%s}"
        % ", ".join(["'t': %r" % t] + ["%r: _self.%s" % (n, n) for n, _ in required])
    )
    for n, _ in optional:
        lines.append("    if _self.%s is not None:\n        _obj[%r] = _self.%s" % (n, n, n))
    lines.append("    return _obj")
    lines.append(
        "def from_wire(_cls, _obj, _raw=b''):\n    _get = _obj.get\n    _self = _new(_cls)"
    )
    for i, (n, kind) in enumerate(required + optional):
        test = _INLINE_KIND.get(kind)
        if test is None:
            scope["_kind%d" % i] = kind
            test = "_kind%d({0})" % i
        absent = "_v is None or not" if i < len(required) else "_v is not None and not"
        lines.append("    _v = _get(%r)" % n)
        lines.append("    if %s (%s):" % (absent, test.format("_v")))
        lines.append("        return _refuse(_cls, _obj, _raw)")
        lines.append("    _self.%s = _v" % n)
    lines.append("    return _self")
    exec("\n".join(lines), scope)  # our own source, written from the fields' names
    scope["from_wire"] = classmethod(scope["from_wire"])
    return {k: scope[k] for k in ("__init__", "to_wire", "from_wire")}


def _refuse(cls: type[Message], obj: dict[str, Any], raw: bytes) -> Any:
    """Message.from_wire, which raises the BadMessage for a frame the compiled one refused."""
    return vars(Message)["from_wire"].__func__(cls, obj, raw)


class Message:
    """Base class. Each message type is a subclass made by @_message: it sets TYPE, its "t" on the
    wire, and annotates its fields. Message types are final: code tells them apart with
    ``type(msg) is Ok`` (cheaper than isinstance), which mypy narrows only for final classes.
    The methods here are the reference for the compiled ones each type gets."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[Field, ...]] = ()
    OPTIONAL: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, **fields: Any) -> None:
        for name, _ in self.REQUIRED:
            setattr(self, name, fields.pop(name))
        for name, _ in self.OPTIONAL:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError("%s got unexpected fields %s" % (type(self).__name__, sorted(fields)))

    def to_wire(self) -> dict[str, Any]:
        obj = {"t": self.TYPE}
        for name, _ in self.REQUIRED:
            obj[name] = getattr(self, name)
        for name, _ in self.OPTIONAL:
            v = getattr(self, name)
            if v is not None:
                obj[name] = v
        return obj

    @classmethod
    def from_wire(cls, obj: dict[str, Any], raw: bytes = b"") -> Self:
        """Build from a decoded JSON object; raise BadMessage naming the first bad field."""
        self = cls.__new__(cls)
        rid = obj.get("id")
        rid = rid if _is_int(rid) else None
        for name, kind in cls.REQUIRED:
            v = obj.get(name)
            if v is None or not kind(v):
                what = "missing" if v is None else "not %s" % _KIND_NAMES[kind]
                raise BadMessage(
                    "%r message: field %r is %s" % (cls.TYPE, name, what), raw, request_id=rid
                )
            setattr(self, name, v)
        for name, kind in cls.OPTIONAL:
            v = obj.get(name)
            if v is not None and not kind(v):
                raise BadMessage(
                    "%r message: field %r is not %s" % (cls.TYPE, name, _KIND_NAMES[kind]),
                    raw,
                    request_id=rid,
                )
            setattr(self, name, v)
        return self

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self.REQUIRED + self.OPTIONAL
        )

    def __ne__(self, other: object) -> bool:
        return not self == other

    # Mutable and compared by value, so unhashable; typeshed declares object.__hash__ a method.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for name, _ in self.REQUIRED + self.OPTIONAL:
            v = getattr(self, name)
            if v is None:
                continue
            if name in _SECRET:
                unit = "bytes" if name == "value" else "pairs"
                parts.append("%s=<%d %s>" % (name, _secret_size(v), unit))
            else:
                parts.append("%s=%r" % (name, v))
        return "%s(%s)" % (type(self).__name__, ", ".join(parts))


# ---- requests (carry "id"; answered by Ok or Err, List and Events by Items then Ok) ------------


@final
@_message
class Hello(Message):
    """Host -> guest: resynchronize. Sent right after a RESYNC byte on every (re)connect and after
    every timeout. epoch names the host's sequence stream for this guest."""

    TYPE = "hello"
    id: int
    v: int
    nonce: str
    epoch: str | None = None


@final
@_message
class Ping(Message):
    """Either way: the cheapest request."""

    TYPE = "ping"
    id: int


@final
@_message
class Set(Message):
    """Set a key. From the host it carries seq (exactly-once, in order); from a local client it has
    none and the origin is the guest."""

    TYPE = "set"
    id: int
    key: str
    value: str
    seq: int | None = None


@final
@_message
class Delete(Message):
    """Delete a key. seq as for Set."""

    TYPE = "del"
    id: int
    key: str
    seq: int | None = None


@final
@_message
class Get(Message):
    """Read one key."""

    TYPE = "get"
    id: int
    key: str


@final
@_message
class List(Message):
    """Read every key: answered by one Item per key, in set order, then Ok(count)."""

    TYPE = "list"
    id: int


@final
@_message
class Put(Message):
    """Local client: set several keys at once (all or none), origin guest."""

    TYPE = "put"
    id: int
    items: list[list[str]]


@final
@_message
class Clear(Message):
    """Local client: delete every key."""

    TYPE = "clear"
    id: int


@final
@_message
class Wait(Message):
    """Local client: answer when key exists (or, with changed, when it is next set)."""

    TYPE = "wait"
    id: int
    key: str
    changed: bool | None = None
    timeout: float | None = None


@final
@_message
class Events(Message):
    """Local client: the recent host events, as Items (key VMAPIEvent) then Ok."""

    TYPE = "events"
    id: int


@final
@_message
class PostEvent(Message):
    """Local client: inject an event (ovmd -e), as if the host had sent it."""

    TYPE = "event"
    id: int
    value: str


# ---- replies --------------------------------------------------------------------------------


@final
@_message
class Ok(Message):
    """Success reply to request id; which optional fields are set depends on the request."""

    TYPE = "ok"
    id: int
    # hello reply: versions, identity, sequence positions
    v: int | None = None
    nonce: str | None = None
    agent: str | None = None
    gid: str | None = None
    gseq: int | None = None
    epoch: str | None = None
    hseq: int | None = None
    # set/del reply: the seq applied, or already applied before
    seq: int | None = None
    dup: bool | None = None
    # del reply: whether the key existed
    found: bool | None = None
    # get / wait reply
    key: str | None = None
    value: str | None = None
    ts: float | None = None
    origin: str | None = None
    # list / events reply: how many Items preceded it
    count: int | None = None


@final
@_message
class Err(Message):
    """Failure reply. id is absent when the failed frame had no usable id."""

    TYPE = "err"
    code: str
    msg: str
    id: int | None = None


@final
@_message
class Item(Message):
    """One entry of a List or Events answer."""

    TYPE = "item"
    id: int
    key: str
    value: str
    ts: float
    origin: str


# ---- notifications (no id, never answered) --------------------------------------------------


@final
@_message
class Changed(Message):
    """Guest -> host: the cache changed (any origin). gseq counts every change, so a gap tells the
    host its mirror missed something and must be refreshed."""

    TYPE = "changed"
    gseq: int
    op: str
    ts: float
    origin: str
    key: str | None = None
    value: str | None = None


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Ping,
        Set,
        Delete,
        Get,
        List,
        Put,
        Clear,
        Wait,
        Events,
        PostEvent,
        Ok,
        Err,
        Item,
        Changed,
    )
}

# Types that are requests, i.e. that the receiver must answer.
REQUEST_TYPES = frozenset(
    ("hello", "ping", "set", "del", "get", "list", "put", "clear", "wait", "events", "event")
)
