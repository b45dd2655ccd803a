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
        out: list[bytes | Resync | FrameTooLong] = []
        if RESYNC[0] in data:
            segments = bytes(data).split(RESYNC)
            self._feed_segment(segments[0], out)
            for seg in segments[1:]:
                if self._discarding:
                    out.append(FrameTooLong(self._discarding, self.max_frame))
                out.append(Resync(len(self._buf) + self._discarding))
                self.reset()
                self._feed_segment(seg, out)
        else:
            self._feed_segment(data, out)
        return out

    def _feed_segment(
        self, seg: bytes | bytearray, out: list[bytes | Resync | FrameTooLong]
    ) -> None:
        start = 0
        n = len(seg)
        buf = self._buf
        while start < n:
            nl = seg.find(DELIMITER, start)
            if nl < 0:
                rest = n - start
                if self._discarding:
                    self._discarding += rest
                elif len(buf) + rest > self.max_frame:
                    self._discarding = len(buf) + rest
                    buf.clear()
                else:
                    buf += seg[start:]
                return
            if self._discarding:
                out.append(FrameTooLong(self._discarding + nl - start, self.max_frame))
                self._discarding = 0
            else:
                if buf:
                    buf += seg[start:nl]
                    frame = bytes(buf)
                    buf.clear()
                else:
                    frame = bytes(seg[start:nl])
                if len(frame) > self.max_frame:
                    out.append(FrameTooLong(len(frame), self.max_frame))
                elif frame.strip():
                    out.append(frame)
            start = nl + 1
