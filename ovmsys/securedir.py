"""Directories a privileged daemon may create files in: nobody else can change what is in them.

A daemon running as root that writes into a directory another user can write to can be made to
write through that user's symlinks, or to read that user's files as its own state. secure() makes
the directory when missing and checks it and every directory above it:

- each is owned by root or by the daemon's own uid;
- the directory itself is writable by its owner only (group and others: not even with the sticky
  bit, which stops others from removing our files, not from planting names we are about to use);
- a directory above it may be writable by others only with the sticky bit (/tmp): then nobody
  else can rename or remove the directories below it that are ours.

It returns the resolved path (no symlinks), for the daemon to use from then on: a symlink on the
way, wherever it lives, cannot be re-pointed later. Every refusal is an UnsafeDirectory (an
OSError) whose text is one line naming the path.
"""

from __future__ import annotations

import errno
import os
import stat


class UnsafeDirectory(OSError):
    """Someone other than root or the daemon's user can change the directory, or one above it."""

    def __str__(self) -> str:
        return str(self.strerror)  # the one line, without "[Errno 1]"


def _problem(path: str, st: os.stat_result, uid: int, itself: bool) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "was replaced by a symbolic link while it was checked"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, uid):
        owners = "root" if uid == 0 else "root or uid %d" % uid
        return "is owned by uid %d, not by %s" % (st.st_uid, owners)
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (itself or not st.st_mode & stat.S_ISVTX):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return "is writable by %s (mode %04o)" % (who, stat.S_IMODE(st.st_mode))
    return None


def check(path: str, uid: int | None = None, itself: bool = True) -> str:
    """The real path of the existing directory ``path`` once it and every directory above it
    passed (``itself`` False: ``path`` is checked as a directory above, the sticky bit allowed);
    raise UnsafeDirectory or OSError."""
    uid = os.geteuid() if uid is None else uid
    real = os.path.realpath(path)
    current = real
    while True:
        st = os.lstat(current)
        problem = _problem(current, st, uid, itself and current == real)
        if problem is not None:
            where = current if current == real else "%s, above %s," % (current, real)
            raise UnsafeDirectory(
                errno.EPERM, "%s %s; only root may be able to change it" % (where, problem)
            )
        parent = os.path.dirname(current)
        if parent == current:
            return real
        current = parent


def secure(path: str, uid: int | None = None, mode: int = 0o755) -> str:
    """Make the directory ``path`` (and those above it) when missing, with ``mode``, and return
    its real path once check() passed; raise UnsafeDirectory or OSError."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        existing = os.path.dirname(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        check(existing, uid, itself=False)  # nobody else can plant what we are about to make
        os.makedirs(path, mode, exist_ok=True)
    return check(path, uid)
