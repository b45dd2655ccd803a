"""A lean client of the daemon's local socket, shared by the CLI's fast path and its click path.

    with Client("/run/ovmd/ovmd.sock") as c:
        reply = c.call("get", key="foo")            # the "ok" reply as a dict
        items = c.collect("list")                    # the "item" dicts of a stream, in order

Same wire format as ovmproto (one compact JSON object and "\\n" per frame), written with
compactjson: ``ovmd -g KEY`` runs in shell loops and must start in a few milliseconds, so this
module must not import orjson (~13 ms with its dependencies), json (re and enum, ~7 ms) or the
message classes.
It imports ``_socket``, the C module under ``socket``: the Python ``socket`` module adds ~8 ms
(selectors, enum, ...) for wrappers we do not need.

Failures are ClientError subclasses carrying the CLI's exit code; their text is one line and
never holds a value.
"""

from __future__ import annotations

import _socket

from ovmproto import compactjson, errorcodes
from ovmproto.errors import OvmError
from ovmproto.limits import FRAME_MAX

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from typing import Any

# Exit codes of the ovmd command (docs/cli.md), by name; an error's comes from its code.
EXIT_OK = 0
EXIT_NOT_FOUND = errorcodes.ovmd_exit("not_found")  # no such key, or a wait timed out
EXIT_USAGE = errorcodes.ovmd_exit("usage")  # bad command line or invalid input
EXIT_UNREACHABLE = errorcodes.ovmd_exit("unreachable")  # cannot talk to the daemon
EXIT_REFUSED = errorcodes.ovmd_exit("internal")  # the daemon refused (quota, denied, internal...)

# How long to wait for an answer before calling the daemon unreachable. Generous: a loaded guest
# may take a while to fsync. A wait request allows this much beyond its own timeout.
DEFAULT_TIMEOUT = 60.0

_RECV_SIZE = 65536


class ClientError(OvmError):
    """A failure the CLI reports in one line and turns into ``exit_code`` (from its code)."""

    @property
    def exit_code(self) -> int:
        return errorcodes.ovmd_exit(self.code)


class BadInput(ClientError):
    """The command line or its input is invalid; nothing was sent to the daemon."""

    code = "usage"


class Unreachable(ClientError):
    """No daemon answers at the socket path, or what answers does not speak our protocol."""

    code = "unreachable"


class DaemonError(ClientError):
    """The daemon answered a request with ``err``; ``code`` is its error code (required)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Client:
    """One connection to the daemon. Requests are answered in order; ids are ours."""

    __slots__ = ("path", "timeout", "_sock", "_buf", "_next_id")

    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout  # seconds, or None to wait forever
        self._sock: _socket.socket | None = None
        self._buf = b""
        self._next_id = 1

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self._connect()

    def _connect(self) -> _socket.socket:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise self._unreachable(e) from None
        self._sock = sock
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- requests -----------------------------------------------------------------------------

    def set_timeout(self, seconds: float | None) -> None:
        """How long any later send or receive may take (None: forever, as a wait may need)."""
        self.timeout = seconds
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def call(self, t: str, **fields: Any) -> dict[str, Any]:
        """Send one request; return its ``ok`` reply (a dict). Raise DaemonError on ``err``."""
        rid = self._send(t, fields)
        while True:
            msg = self._read_reply(rid)
            if msg.get("t") == "ok":
                return msg
            # An "item" outside a stream request: not ours to handle; skip it.

    def collect(self, t: str, **fields: Any) -> list[dict[str, Any]]:
        """Send a streaming request (list, events); return its items, in order."""
        rid = self._send(t, fields)
        items: list[dict[str, Any]] = []
        while True:
            msg = self._read_reply(rid)
            kind = msg.get("t")
            if kind == "ok":
                return items
            if kind == "item":
                if type(msg.get("key")) is not str or type(msg.get("value")) is not str:
                    raise self._garbled("an item without a key or value")
                items.append(msg)

    # -- internals ----------------------------------------------------------------------------

    def _send(self, t: str, fields: dict[str, Any]) -> int:
        sock = self._sock if self._sock is not None else self._connect()
        rid = self._next_id
        self._next_id += 1
        obj: dict[str, Any] = {"t": t, "id": rid}
        obj.update(fields)
        data = compactjson.dumps(obj).encode("utf-8") + b"\n"
        if len(data) > FRAME_MAX:
            # Several -p values of up to 8 KiB each can add up past one frame; the daemon would
            # discard the request, so refuse it here, naming the limit.
            raise BadInput(
                "the request is %d bytes, the limit is %d bytes: set fewer or smaller "
                "values in one call" % (len(data), FRAME_MAX)
            )
        try:
            sock.sendall(data)
        except OSError as e:
            # The daemon may have said why before it hung up (e.g. err denied): read that first.
            if self._buf or self._peek_pending(sock):
                return rid
            raise self._unreachable(e) from None
        return rid

    def _peek_pending(self, sock: _socket.socket) -> bool:
        try:
            chunk = sock.recv(_RECV_SIZE)
        except OSError:
            return False
        self._buf += chunk
        return bool(chunk)

    def _read_reply(self, rid: int) -> dict[str, Any]:
        """The next ok/err/item frame for ``rid``; raise DaemonError for its err."""
        while True:
            frame = self._read_frame()
            try:
                msg = compactjson.loads(frame)
            except ValueError:
                raise self._garbled("a frame that is not JSON") from None
            if type(msg) is not dict:
                raise self._garbled("a frame that is not a JSON object")
            kind = msg.get("t")
            mid = msg.get("id")
            if kind == "err" and (mid == rid or mid is None):
                code = msg.get("code")
                text = msg.get("msg")
                raise DaemonError(
                    _one_line(text if type(text) is str and text else code),
                    code if type(code) is str else "internal",
                )
            if mid != rid or kind not in ("ok", "item"):
                continue  # not for us (a reply to nothing we asked, or a notification)
            return msg

    def _read_frame(self) -> bytes:
        sock = self._sock
        assert sock is not None, "a reply is read only after a request was sent"
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                frame = self._buf[:nl]
                self._buf = self._buf[nl + 1 :]
                if b"\xff" in frame:  # RESYNC: whatever came before it is a stale partial frame
                    frame = frame[frame.rfind(b"\xff") + 1 :]
                if frame.strip():
                    return frame
                continue
            if len(self._buf) > FRAME_MAX:
                raise self._garbled("a frame over %d bytes" % FRAME_MAX)
            try:
                chunk = sock.recv(_RECV_SIZE)
            except OSError as e:
                raise self._unreachable(e) from None
            if not chunk:
                raise Unreachable(
                    "the ovmd daemon at %s closed the connection without answering" % self.path
                )
            self._buf += chunk

    def _unreachable(self, e: OSError) -> Unreachable:
        if isinstance(e, _socket.timeout) and self.timeout is not None:
            return Unreachable(
                "the ovmd daemon at %s did not answer within %g s" % (self.path, self.timeout)
            )
        reason = e.strerror or str(e) or type(e).__name__
        return Unreachable("cannot reach the ovmd daemon at %s: %s" % (self.path, reason))

    def _garbled(self, what: str) -> Unreachable:
        return Unreachable(
            "the program at %s does not speak the ovmd protocol (it sent %s)" % (self.path, what)
        )
