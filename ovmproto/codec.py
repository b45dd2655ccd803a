"""Frames to typed messages and back (ovmproto.jsonlib), and the Reader that combines framing and
decoding.

    reader = Reader()
    for event in reader.feed(data):      # data: whatever one read() returned
        Message | Resync | ProtocolError  # a ProtocolError is returned, not raised
    channel.write(encode(Ok(id=1)))
"""

from __future__ import annotations

from . import jsonlib
from .errors import BadFrame, BadMessage, ProtocolError
from .framing import DELIMITER, FrameDecoder, Resync
from .messages import MESSAGE_TYPES, Message, _is_int


def encode(msg: Message) -> bytes:
    """The frame for ``msg``: compact JSON and the delimiter."""
    return jsonlib.dumps(msg.to_wire()) + DELIMITER


def decode(frame: bytes) -> Message:
    """One frame (bytes, no delimiter) to a typed message; raise BadFrame or BadMessage."""
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


__all__ = ["Reader", "Resync", "decode", "encode"]
