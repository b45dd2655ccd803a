"""Replace a file atomically and durably.

write_atomic() writes a new temp file in the same directory (``PATH.tmp-`` and 16 random hex
digits), fsyncs it, renames it over PATH and fsyncs the directory, so the rename itself is on disk.
A kill -9 or a power cut at any point leaves either the old file or the new one, never a mixture;
when it returns, the new content survives a crash. On failure the temp file is removed and the old
file is untouched.

The temp file is created, never opened: O_CREAT | O_EXCL | O_NOFOLLOW under a name nobody can
guess, so a symlink or a file someone planted at a name we might use is never written through
(a root daemon would otherwise overwrite any file it points to). Renaming replaces PATH itself,
symlink or not, and never writes through it.
"""

from __future__ import annotations

import binascii
import os
import stat

_HEX = "0123456789abcdef"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_path(path: str) -> str:
    """A fresh name for write_atomic()'s temp file next to ``path``: unpredictable, never reused."""
    return "%s.tmp-%s" % (path, binascii.hexlify(os.urandom(8)).decode("ascii"))


def remove_leftovers(path: str) -> list[str]:
    """Remove the temp files a killed write_atomic() left next to ``path``; return their names.

    They may hold what the file holds (values, secrets included) and their names are never reused,
    so nobody else would ever remove them. Only regular files owned by this process's user with
    exactly write_atomic()'s name shape are removed (lstat: a symlink is never followed).
    """
    directory, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp-"
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        suffix = name[len(prefix) :]
        if not name.startswith(prefix) or len(suffix) != 16 or suffix.strip(_HEX):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(full)
                removed.append(name)
        except OSError:
            continue
    return removed


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``, whatever the umask); raise OSError."""
    tmp = temp_path(path)
    # Raises FileExistsError (O_EXCL) or ELOOP (O_NOFOLLOW) rather than open what is there.
    fd = os.open(tmp, _CREATE, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask narrowed the mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # ours: we created it
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
