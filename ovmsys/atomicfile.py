"""Replace a file atomically and durably.

write_atomic() writes a temp file in the same directory (``PATH.tmp-PID``), fsyncs it, renames it
over PATH and fsyncs the directory, so the rename itself is on disk. A kill -9 or a power cut at
any point leaves either the old file or the new one, never a mixture; when it returns, the new
content survives a crash. On failure the temp file is removed and the old file is untouched.
"""

from __future__ import annotations

import os


def temp_path(path: str) -> str:
    """Where write_atomic() writes before its rename: one per process, so writers never share it."""
    return "%s.tmp-%d" % (path, os.getpid())


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``, whatever the umask); raise OSError."""
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            # The umask narrowed the mode, and a temp file left by a crash kept its old one.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def fsync_directory(directory: str) -> None:
    """Make the renames and unlinks done in ``directory`` durable; raise OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
