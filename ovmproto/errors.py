"""The one error hierarchy of the project. Both daemons subclass these; nothing else is raised
across a package boundary.

    OvmError                      base of everything we raise on purpose
     ├── ProtocolError            the peer sent something we cannot accept (carries the raw bytes)
     │    ├── FrameTooLong        a frame over FRAME_MAX; it was discarded up to the next delimiter
     │    ├── BadFrame            not UTF-8, not JSON, or not a JSON object
     │    └── BadMessage          no "t" string, a known "t" with a missing or mistyped field,
     │                            or an unknown "t" (an object: its "id" can be answered)
     └── RemoteError              the peer answered a request with an "err" reply

Each carries ``code``, one of ovmproto.errorcodes (which also says how each CLI and the bridge's
API report it). A ProtocolError is usually *returned* by the decoder as an event rather than
raised: the peer misbehaving is an expected input, not an exception in our control flow.
"""


class OvmError(Exception):
    """Base class. ``code`` is the machine-readable code of docs/protocol.md."""

    code = "internal"

    def __init__(self, message: str, code: "str | None" = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProtocolError(OvmError):
    code = "bad_frame"

    def __init__(self, message: str, raw: bytes = b"", code: "str | None" = None) -> None:
        super().__init__(message, code)
        # At most a short prefix: a frame may hold a secret, so never keep or log more than needed.
        self.raw = bytes(raw[:64])


class FrameTooLong(ProtocolError):
    code = "frame_too_long"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("frame of %d bytes discarded, the limit is %d bytes" % (size, limit))
        self.size = size
        self.limit = limit


class BadFrame(ProtocolError):
    code = "bad_frame"


class BadMessage(ProtocolError):
    code = "bad_request"

    def __init__(
        self,
        message: str,
        raw: bytes = b"",
        code: "str | None" = None,
        request_id: "int | None" = None,
    ) -> None:
        super().__init__(message, raw, code)
        # When the frame was an object with a usable "id" the receiver can answer it with an error.
        self.request_id = request_id


class RemoteError(OvmError):
    pass
