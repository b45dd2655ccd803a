"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

Uses systemd.daemon.notify when systemd-python is installed, else sends the datagram itself:
AF_UNIX SOCK_DGRAM to $NOTIFY_SOCKET, where a leading '@' names the abstract namespace ('\\0').
Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call does nothing.
"""

import logging
import os
import socket

from .logsetup import RateLimited

log = logging.getLogger(__name__)


def socket_address(value):
    """The sockaddr for a $NOTIFY_SOCKET value, or None when it is unusable."""
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    return None  # e.g. vsock:... which this sender does not speak


def watchdog_interval(environ=None, pid=None):
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; another means us not.
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
    """Sends notify datagrams without systemd-python."""

    def __init__(self, address):
        self.address = address
        self._sock = None

    def __call__(self, text):
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(text.encode("utf-8"), self.address)

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _systemd_sender():
    try:
        from systemd import daemon
    except ImportError:
        return None

    def send(text):
        daemon.notify(text)

    return send


class Notifier:
    """Tells systemd how the daemon is doing. Failures are logged (rate-limited), never raised:
    a missing supervisor must not stop the agent."""

    def __init__(self, address=None, prefer_systemd=True, environ=None):
        env = os.environ if environ is None else environ
        if address is None:
            address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.enabled = address is not None
        self._send = None
        self._builtin = None
        if self.enabled:
            self._send = _systemd_sender() if prefer_systemd else None
            if self._send is None:
                self._builtin = BuiltinSender(address)
                self._send = self._builtin
        self._failures = RateLimited(log)
        self._status = None

    def notify(self, text):
        if not self.enabled:
            return False
        try:
            self._send(text)
        except OSError as e:
            self._failures.warning("cannot notify systemd: %s", e.strerror or e)
            return False
        return True

    def ready(self, status=None):
        self._status = status
        return self.notify("READY=1\nSTATUS=%s" % status if status else "READY=1")

    def status(self, status):
        if status == self._status:
            return True
        self._status = status
        return self.notify("STATUS=%s" % status)

    def watchdog(self):
        return self.notify("WATCHDOG=1")

    def stopping(self):
        return self.notify("STOPPING=1")

    def close(self):
        if self._builtin is not None:
            self._builtin.close()
