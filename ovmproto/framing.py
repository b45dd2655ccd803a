"""Framing: a byte stream in, whole frames out, with a hard size limit and resynchronization.

A frame is one compact JSON object followed by b"\\n" (JSON text never contains a raw newline).
The byte 0xFF (RESYNC) never occurs in UTF-8: wherever it appears the receiver drops any partial
frame it holds. Senders write it before a Hello and before the reply to one, so stale bytes left
in the channel by an earlier connection can never join a new frame (on the real port stale bytes
survive reconnects in both directions: docs/virtio-serial.md).

No JSON here, no I/O: FrameDecoder.feed() takes whatever a read() returned, any chunking, and
returns events; memory stays within max_frame however the peer behaves.
"""

from __future__ import annotations

from .errors import FrameTooLong
from .limits import FRAME_MAX

TYPE_CHECKING = False  # mypy treats a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from typing import final
else:

    def final(cls: type) -> type:
        """Only a mark for type checkers, without importing typing."""
        return cls


DELIMITER = b"\n"
RESYNC = b"\xff"


@final  # told apart with type(event) is Resync, which mypy narrows only for a final class
class Resync:
    """Event: the peer sent RESYNC; ``dropped`` bytes of partial frame were discarded."""

    __slots__ = ("dropped",)

    def __init__(self, dropped: int = 0) -> None:
        self.dropped = dropped

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resync) and other.dropped == self.dropped

    def __repr__(self) -> str:
        return "Resync(dropped=%d)" % self.dropped


class FrameDecoder:
    """Splits a byte stream into frames (bytes, without the delimiter).

    feed() returns a list whose items are frames (bytes), Resync events and FrameTooLong errors.
    Blank frames (only whitespace, e.g. a stray "\\r\\n") are skipped.
    """

    __slots__ = ("max_frame", "_buf", "_discarding")

    def __init__(self, max_frame: int = FRAME_MAX) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._discarding = 0  # >0: inside an over-long frame, counting its bytes until a delimiter

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than max_frame)."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """Whether bytes of an unfinished frame were read: held, or being discarded as too long."""
        return bool(self._buf) or self._discarding > 0

    def reset(self) -> None:
        """Forget any partial input (a new connection starts clean)."""
        self._buf.clear()
        self._discarding = 0

    def feed(self, data: bytes | bytearray) -> list[bytes | Resync | FrameTooLong]:
        out: list[bytes | Resync | FrameTooLong]
        if type(data) is not bytes:
            data = bytes(data)  # frames are bytes, whatever the caller read into
        if RESYNC[0] in data:
            segments = data.split(RESYNC)
            out = self.feed(segments[0])
            for seg in segments[1:]:
                if self._discarding:
                    out.append(FrameTooLong(self._discarding, self.max_frame))
                out.append(Resync(len(self._buf) + self._discarding))
                self.reset()
                out += self.feed(seg)  # a segment holds no RESYNC
            return out
        # split() cuts every frame of a read in one call: a read usually holds whole frames, one
        # or many (pipelined requests), and this is the per-message path of both daemons.
        out = []
        pieces = data.split(DELIMITER)
        rest = pieces.pop()  # after the last delimiter: the start of a frame not yet complete
        buf = self._buf
        if pieces:
            max_frame = self.max_frame
            first = 0
            if self._discarding:
                out.append(FrameTooLong(self._discarding + len(pieces[0]), max_frame))
                self._discarding = 0
                first = 1
            elif buf:
                buf += pieces[0]
                pieces[0] = bytes(buf)
                buf.clear()
            for i in range(first, len(pieces)):
                frame = pieces[i]
                if len(frame) > max_frame:
                    out.append(FrameTooLong(len(frame), max_frame))
                elif frame.strip():
                    out.append(frame)
        if rest:
            if self._discarding:
                self._discarding += len(rest)
            elif len(buf) + len(rest) > self.max_frame:
                self._discarding = len(buf) + len(rest)
                buf.clear()
            else:
                buf += rest
        return out
