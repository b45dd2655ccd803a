"""Frames to typed messages and back (ovmproto.jsonlib), and the Reader that combines framing and
decoding.

    reader = Reader()
    for event in reader.feed(data):      # data: whatever one read() returned
        Message | Resync | ProtocolError  # a ProtocolError is returned, not raised
    channel.write(encode(Ok(id=1)))

The agent's hot path skips the typed messages where it can, with the same bytes and meaning:
quick_request() recognizes a ping or a get written exactly as encode() writes one (anything else
is left to decode()), encode_entry() writes the replies that carry a cache entry (a get's Ok, a
list's Item), and EntryReplies keeps those of the entries read last.
"""

from __future__ import annotations

from . import jsonlib
from .errors import BadFrame, BadMessage, ProtocolError
from .framing import DELIMITER, FrameDecoder, Resync
from .messages import _INT_MAX, MESSAGE_TYPES, Item, Message, Ok, _is_int

_dumps_str = jsonlib.dumps_str
_dumps_float = jsonlib.dumps_float

_PING = b'{"t":"ping","id":'
_OK = b'{"t":"ok","id":'
_GET = b'{"t":"get","id":'
_GET_KEY = b',"key":"'
_ID_DIGITS_MAX = len(str(_INT_MAX))


def encode(msg: Message) -> bytes:
    """The frame for ``msg``: compact JSON and the delimiter."""
    return jsonlib.dumps(msg.to_wire()) + DELIMITER


def encode_entry(t: str, request_id: int, key: str, value: str, ts: float, origin: str) -> bytes:
    """``encode(Ok(id=request_id, key=key, value=value, ts=ts, origin=origin))`` for t "ok", the
    same with Item for t "item": the same bytes (both write these fields in this order), built
    from the fields' own JSON, where the encoder would first build a message and a dict."""
    if (
        type(request_id) is int
        and type(ts) is float
        and type(key) is str
        and type(value) is str
        and type(origin) is str
        and t in ("ok", "item")
    ):
        return b'{"t":"%s","id":%d,"key":%s,"value":%s,"ts":%s,"origin":%s}\n' % (
            b"ok" if t == "ok" else b"item",
            request_id,
            _dumps_str(key),
            _dumps_str(value),
            _dumps_float(ts),
            _dumps_str(origin),
        )
    # Anything unusual (an id that is a bool, an integer timestamp...) as encode() writes it.
    if t == "ok":
        return encode(Ok(id=request_id, key=key, value=value, ts=ts, origin=origin))
    if t == "item":
        return encode(Item(id=request_id, key=key, value=value, ts=ts, origin=origin))
    raise ValueError("encode_entry writes an ok or an item, not %r" % t)


class EntryReplies:
    """``encode_entry("ok", ...)`` for a get, remembering the part after the id for the last
    entries read: a host reading an unchanged entry again (polling a key) gets its bytes without
    the value being encoded again (~5 µs for 8 KiB of JSON without orjson, and three copies).

    An entry counts as unchanged while its value is the very same string object (strings are
    immutable: same object, same text) and its ts and origin are equal. At most ``budget`` bytes
    are kept, the oldest dropped first; forget() drops a key whose entry changed or went away, so
    that a deleted value does not linger here.
    """

    __slots__ = ("budget", "_memo", "_size")

    def __init__(self, budget: int = 64 * 1024) -> None:
        self.budget = budget
        self._memo: dict[str, tuple[str, float, str, bytes]] = {}
        self._size = 0

    def ok(self, request_id: int, key: str, value: str, ts: float, origin: str) -> bytes:
        if type(request_id) is not int:  # (a bool, say) as encode_entry writes it
            return encode_entry("ok", request_id, key, value, ts, origin)
        head = b'{"t":"ok","id":%d' % request_id
        memo = self._memo.get(key)
        if memo is not None and memo[0] is value and memo[1] == ts and memo[2] == origin:
            return head + memo[3]
        frame = encode_entry("ok", request_id, key, value, ts, origin)
        if frame.startswith(head) and len(frame) - len(head) <= self.budget:
            self.forget(key)
            rest = frame[len(head) :]
            self._memo[key] = (value, ts, origin, rest)
            self._size += len(rest)
            while self._size > self.budget:
                oldest = next(iter(self._memo))
                self._size -= len(self._memo.pop(oldest)[3])
        return frame

    def forget(self, key: str | None = None) -> None:
        """Drop what is kept for ``key``; for None, everything."""
        if key is None:
            self._memo.clear()
            self._size = 0
        else:
            memo = self._memo.pop(key, None)
            if memo is not None:
                self._size -= len(memo[3])

    @property
    def size(self) -> int:
        """Bytes kept."""
        return self._size


def quick_request(frame: bytes) -> tuple[int, str | None] | None:
    """(id, None) for a ping, (id, key) for a get, when ``frame`` is one written exactly as
    encode() writes it: no other field, no space, a key without escapes or control characters.
    decode() would return the same Ping or Get; for anything else (None) it is the judge. A frame
    read so never holds a delimiter or a RESYNC byte.

    The host's ping and get are what the agent answers most often, and decoding them costs more
    than answering them.
    """
    key: str | None = None
    if frame.startswith(_PING):
        if frame[-1:] != b"}":
            return None
        digits = frame[17:-1]
    elif frame.startswith(_GET) and frame[-2:] == b'"}':
        comma = frame.find(b",", 16)
        # The key's quotes are two: the one opening it must not be the one closing the object.
        if comma < 17 or not frame.startswith(_GET_KEY, comma) or len(frame) < comma + 10:
            return None
        raw_key = frame[comma + 8 : -2]
        if b'"' in raw_key or b"\\" in raw_key:
            return None
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return None  # decode() reports it
        # isprintable(): no control character, which JSON refuses raw in a string (it is False
        # for some other characters too: those go through decode()).
        if not key.isprintable():
            return None
        digits = frame[16:comma]
    else:
        return None
    rid = _wire_id(digits)
    return None if rid is None else (rid, key)


def _wire_id(digits: bytes) -> int | None:
    """The id that JSON digits spell when it is a usable one, 0..2**63-1 (ASCII digits only, for
    bytes.isdigit; no sign, and no leading zero, which JSON forbids); else None."""
    if (
        digits.isdigit()
        and len(digits) <= _ID_DIGITS_MAX
        and (digits[0] != 0x30 or len(digits) == 1)
    ):
        rid = int(digits)
        if rid <= _INT_MAX:
            return rid
    return None


def decode(frame: bytes) -> Message:
    """One frame (bytes, no delimiter) to a typed message; raise BadFrame or BadMessage."""
    if frame.startswith(_OK) and frame[-1:] == b"}":
        # The commonest reply, a bare ok (to a ping), read without JSON: the same Ok.
        rid = _wire_id(frame[15:-1])
        if rid is not None:
            return Ok(id=rid)
    try:
        obj = jsonlib.loads(frame)
    except jsonlib.JSONDecodeError as e:
        # Both backends report invalid UTF-8, invalid JSON and nesting deeper than its limit alike.
        reason = str(e).split(":", 1)[0]
        if "utf-8" in str(e).lower() or "surrogate" in str(e).lower():
            raise BadFrame("frame is not valid UTF-8", frame) from None
        raise BadFrame("frame is not valid JSON (%s)" % reason, frame) from None
    if type(obj) is not dict:
        raise BadFrame("frame is not a JSON object", frame)
    t = obj.get("t")
    cls = MESSAGE_TYPES.get(t) if type(t) is str else None
    if cls is None:
        rid = obj.get("id")
        # The same test as a known type's id: an id over 2**63-1 cannot be echoed in an Err.
        rid = rid if _is_int(rid) else None
        if type(t) is not str:
            raise BadMessage('frame has no "t" string naming its type', frame, request_id=rid)
        raise BadMessage(
            "unknown message type %r" % t[:32], frame, code="unknown_type", request_id=rid
        )
    return cls.from_wire(obj, frame)


class Reader:
    """Bytes in, events out: typed messages, Resync events, and ProtocolError instances."""

    __slots__ = ("_frames",)

    def __init__(self, max_frame: int | None = None) -> None:
        self._frames = FrameDecoder() if max_frame is None else FrameDecoder(max_frame)

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    @property
    def in_frame(self) -> bool:
        return self._frames.in_frame

    def reset(self) -> None:
        self._frames.reset()

    def feed(self, data: bytes | bytearray) -> list[Message | Resync | ProtocolError]:
        events: list[Message | Resync | ProtocolError] = []
        for item in self._frames.feed(data):
            # type() rather than isinstance(): measurably cheaper in this per-frame loop.
            if type(item) is bytes:
                try:
                    events.append(decode(item))
                except (BadFrame, BadMessage) as e:
                    events.append(e)
            else:
                # A Resync or a FrameTooLong (frames are exactly bytes); mypy narrows the other
                # branch of isinstance() only.
                events.append(item)  # type: ignore[arg-type]
        return events


__all__ = ["EntryReplies", "Reader", "Resync", "decode", "encode", "encode_entry", "quick_request"]
