"""What modules share: running a command (run_cmd, the original's name) and writing files.

Third-party modules call ``run_cmd(['cmd', 'arg'])``. It never goes through a shell, raises
CommandError (one line: the command's name and its last line of error output) when the command
fails, and returns the command's standard output as text.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence

from ovmsys.atomicfile import write_atomic


class TemplateError(Exception):
    """A module refuses or fails: one line, naming the key that is the cause; never a value."""


class CommandError(TemplateError):
    pass


def run_cmd(
    cmd: Sequence[str],
    success_return_code: Iterable[int] = (0,),
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 120.0,
) -> str:
    """Run ``cmd`` (an argument list, no shell); return its standard output.

    ``input`` is written to its standard input (secrets go there, never into arguments, which
    other users can read in /proc)."""
    args = [str(a) for a in cmd]
    try:
        done = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError("%s: command not found" % args[0]) from e
    except subprocess.TimeoutExpired as e:
        raise CommandError("%s: no answer within %ss" % (args[0], timeout)) from e
    if done.returncode not in tuple(success_return_code):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else "exit status %d" % done.returncode
        raise CommandError("%s failed: %s" % (os.path.basename(args[0]), why[:200]))
    return done.stdout


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically with ``text`` (its directory made if missing)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text.encode("utf-8"), mode)


def read_file(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return default


def remove(path: str) -> bool:
    """Remove ``path`` if it is there (never a directory); True if it was."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
