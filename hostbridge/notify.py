"""A small sd_notify sender: systemd's readiness protocol without systemd-python.

A datagram to the unix socket named by $NOTIFY_SOCKET ("@name" is an abstract socket). Silent when
there is no such socket: the daemon also runs outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1"); return whether it was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode("utf-8"))
        return True
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", state.split("=", 1)[0], e)
        return False


def watchdog_interval(environ=None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked for.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for; another means not us.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wpid = env.get("WATCHDOG_PID")
    if usec <= 0 or (wpid and wpid != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 2e6
