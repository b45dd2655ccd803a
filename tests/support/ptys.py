"""Channels as the guest agent sees them: a raw pty, reached through a symlink."""

from __future__ import annotations

import os
import termios
import tty


def open_raw_pty() -> tuple[int, int, str]:
    """(master fd, slave fd, slave path) of a new pty whose guest end is raw (TCSANOW); the master
    is non-blocking."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def point_link(link: str, target: str) -> None:
    """Atomically make the symlink ``link`` point at ``target`` (a reader never sees it missing)."""
    tmp = "%s.new-%d" % (link, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, link)
