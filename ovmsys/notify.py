"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

Uses systemd.daemon.notify when systemd-python is installed, else sends the datagram itself:
AF_UNIX SOCK_DGRAM to $NOTIFY_SOCKET, where a leading '@' names the abstract namespace ('\\0').
Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call does nothing, so a
daemon runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


def socket_address(value: str | None) -> str | None:
    """The sockaddr for a $NOTIFY_SOCKET value, or None when it is unusable."""
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    return None  # e.g. vsock:... which this sender does not speak


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; another means not us.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2e6


class BuiltinSender:
    """Sends notify datagrams without systemd-python, on one socket kept open between calls."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None

    def __call__(self, text: str) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(text.encode("utf-8"), self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _systemd_sender() -> Callable[[str], None] | None:
    try:
        # Not `from systemd import daemon`: mypy would look in this repository's systemd/ (unit
        # files), a namespace package without it, before the optional systemd-python.
        import systemd.daemon as daemon
    except ImportError:
        return None

    def send(text: str) -> None:
        daemon.notify(text)

    return send


class Notifier:
    """Tells systemd how the daemon is doing. Failures are logged (rate-limited), never raised:
    a missing supervisor must not stop the daemon. Each call returns whether it was sent."""

    def __init__(
        self,
        address: str | None = None,
        prefer_systemd: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        if address is None:
            address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.enabled = address is not None
        self._send: Callable[[str], None] | None = None
        self._builtin: BuiltinSender | None = None
        if address is not None:
            self._send = _systemd_sender() if prefer_systemd else None
            if self._send is None:
                self._builtin = BuiltinSender(address)
                self._send = self._builtin
        self._failures = RateLimitedLog(log)
        self._status: str | None = None

    def notify(self, text: str) -> bool:
        if self._send is None:
            return False
        try:
            self._send(text)
        except OSError as e:
            self._failures.warn("send", "cannot notify systemd: %s", e.strerror or e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        self._status = status
        return self.notify("READY=1\nSTATUS=%s" % status if status else "READY=1")

    def status(self, status: str) -> bool:
        """Send STATUS= unless it is what systemd already shows."""
        if status == self._status:
            return True
        self._status = status
        return self.notify("STATUS=%s" % status)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._builtin is not None:
            self._builtin.close()
