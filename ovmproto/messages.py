"""Typed messages and their mapping to and from the wire's JSON objects.

Every frame is a JSON object whose "t" names its type. Requests carry an "id" that the reply
("ok", "err" or a stream of "item" then "ok") echoes. Unknown fields are ignored (a newer peer may
send more); a known field of the wrong type is a BadMessage. docs/protocol.md is the prose of this.

Values may be secrets: ``repr()`` of a message never shows a value, only its size.
"""

import math

from .errors import BadMessage

# Field kinds. Each is (name, checker) where the checker returns True when the decoded JSON value
# is acceptable. Integers exclude bool (JSON true is not 1) and stay within 63 bits.
_INT_MAX = (1 << 63) - 1


def _is_int(v):
    return type(v) is int and 0 <= v <= _INT_MAX


def _is_str(v):
    return type(v) is str


def _is_bool(v):
    return type(v) is bool


def _is_num(v):
    return (type(v) is int and abs(v) <= _INT_MAX) or (type(v) is float and math.isfinite(v))


def _is_items(v):
    return type(v) is list and all(
        type(p) is list and len(p) == 2 and type(p[0]) is str and type(p[1]) is str for p in v
    )


INT, STR, BOOL, NUM, ITEMS = _is_int, _is_str, _is_bool, _is_num, _is_items
_KIND_NAMES = {
    _is_int: "an integer",
    _is_str: "a string",
    _is_bool: "a boolean",
    _is_num: "a number",
    _is_items: "a list of [key, value] pairs",
}

# Fields whose content may be secret: repr shows their size only.
_SECRET = frozenset(("value", "items"))

ORIGIN_HOST = "host"
ORIGIN_GUEST = "guest"
ORIGINS = (ORIGIN_HOST, ORIGIN_GUEST)

OP_SET = "set"
OP_DEL = "del"
OP_CLEAR = "clear"
CHANGE_OPS = (OP_SET, OP_DEL, OP_CLEAR)


def _secret_size(v):
    """The size repr shows: UTF-8 bytes of a string (the unit of the limits), else its length."""
    if type(v) is str:
        return len(v.encode("utf-8", "surrogatepass"))
    return len(v)


class Message:
    """Base class. Subclasses set TYPE, REQUIRED and OPTIONAL as tuples of (name, kind)."""

    __slots__ = ()
    TYPE = ""
    REQUIRED = ()
    OPTIONAL = ()

    def __init__(self, **fields):
        for name, _ in self.REQUIRED:
            setattr(self, name, fields.pop(name))
        for name, _ in self.OPTIONAL:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError("%s got unexpected fields %s" % (type(self).__name__, sorted(fields)))

    def to_wire(self):
        obj = {"t": self.TYPE}
        for name, _ in self.REQUIRED:
            obj[name] = getattr(self, name)
        for name, _ in self.OPTIONAL:
            v = getattr(self, name)
            if v is not None:
                obj[name] = v
        return obj

    @classmethod
    def from_wire(cls, obj, raw=b""):
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

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self.REQUIRED + self.OPTIONAL
        )

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __repr__(self):
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


def _define(name, type_, required=(), optional=(), doc=""):
    """Make a Message subclass; __slots__ keeps instances small and attribute access fast."""
    slots = tuple(n for n, _ in required) + tuple(n for n, _ in optional)
    return type(
        name,
        (Message,),
        {
            "__slots__": slots,
            "TYPE": type_,
            "REQUIRED": tuple(required),
            "OPTIONAL": tuple(optional),
            "__doc__": doc,
        },
    )


# ---- requests (carry "id"; answered by Ok or Err, List and Events by Items then Ok) ------------

Hello = _define(
    "Hello",
    "hello",
    [("id", INT), ("v", INT), ("nonce", STR)],
    [("epoch", STR)],
    "Host -> guest: resynchronize. Sent right after a RESYNC byte on every (re)connect "
    "and after every timeout. epoch names the host's sequence stream for this guest.",
)
Ping = _define("Ping", "ping", [("id", INT)], doc="Either way: the cheapest request.")
Set = _define(
    "Set",
    "set",
    [("id", INT), ("key", STR), ("value", STR)],
    [("seq", INT)],
    "Set a key. From the host it carries seq (exactly-once, in order); from a local "
    "client it has none and the origin is the guest.",
)
Delete = _define(
    "Delete", "del", [("id", INT), ("key", STR)], [("seq", INT)], "Delete a key. seq as for Set."
)
Get = _define("Get", "get", [("id", INT), ("key", STR)], doc="Read one key.")
List = _define(
    "List",
    "list",
    [("id", INT)],
    doc="Read every key: answered by one Item per key, in set order, then Ok(count).",
)
Put = _define(
    "Put",
    "put",
    [("id", INT), ("items", ITEMS)],
    doc="Local client: set several keys at once (all or none), origin guest.",
)
Clear = _define("Clear", "clear", [("id", INT)], doc="Local client: delete every key.")
Wait = _define(
    "Wait",
    "wait",
    [("id", INT), ("key", STR)],
    [("changed", BOOL), ("timeout", NUM)],
    "Local client: answer when key exists (or, with changed, when it is next set).",
)
Events = _define(
    "Events",
    "events",
    [("id", INT)],
    doc="Local client: the recent host events, as Items (key VMAPIEvent) then Ok.",
)
PostEvent = _define(
    "PostEvent",
    "event",
    [("id", INT), ("value", STR)],
    doc="Local client: inject an event (ovmd -e), as if the host had sent it.",
)

# ---- replies --------------------------------------------------------------------------------

Ok = _define(
    "Ok",
    "ok",
    [("id", INT)],
    [
        ("v", INT),
        ("nonce", STR),
        ("agent", STR),
        ("gid", STR),
        ("gseq", INT),
        ("epoch", STR),
        ("hseq", INT),  # hello reply: versions, identity, sequence positions
        ("seq", INT),
        ("dup", BOOL),  # set/del reply: the seq applied, or already applied before
        ("found", BOOL),  # del reply: whether the key existed
        ("key", STR),
        ("value", STR),
        ("ts", NUM),
        ("origin", STR),  # get / wait reply
        ("count", INT),  # list / events reply: how many Items preceded it
    ],
    "Success reply to request id; which optional fields are set depends on the request.",
)
Err = _define(
    "Err",
    "err",
    [("code", STR), ("msg", STR)],
    [("id", INT)],
    "Failure reply. id is absent when the failed frame had no usable id.",
)
Item = _define(
    "Item",
    "item",
    [("id", INT), ("key", STR), ("value", STR), ("ts", NUM), ("origin", STR)],
    doc="One entry of a List or Events answer.",
)

# ---- notifications (no id, never answered) --------------------------------------------------

Changed = _define(
    "Changed",
    "changed",
    [("gseq", INT), ("op", STR), ("ts", NUM), ("origin", STR)],
    [("key", STR), ("value", STR)],
    "Guest -> host: the cache changed (any origin). gseq counts every change, so "
    "a gap tells the host its mirror missed something and must be refreshed.",
)

MESSAGE_TYPES = {
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
