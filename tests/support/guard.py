"""No test touches the real daemons' paths (/etc/ovmd.conf, /run/ovmd, /run/hostbridge, and the
bridge's /etc/hostbridge and /var/lib/hostbridge: realpath_guard.REAL_PATHS).

The suite runs as root on developer machines that may run the real ovmd and hostbridge: a test that
forgot --socket would talk to the real daemon, one that forgot --config would read the machine's
configuration. Three nets, spread by the autouse fixtures in tests/conftest.py:

1. In the pytest process an audit hook refuses such an access before it happens (RealPathAccess,
   a PermissionError; guard_site/realpath_guard.py).
2. Every Python child gets the same hook: for the session, guard_site/ goes first on PYTHONPATH (its
   sitecustomize installs the hook) and $REALPATH_GUARD_LOG names a file where children record
   what they were refused. A test that builds a child's environment keeps both: start from
   os.environ, or use tests.support.processes.child_env.
3. For programs that are not Python, or were given an environment without the guard: none of the
   real paths may appear or disappear during a test. (Not "change": a real daemon running on the
   machine renames files in its own directory all the time, and must not fail the suite.)

After each test (see take_problems) anything found fails it, saying what was touched and by which
process. A refusal in a fixture shared by several tests shows up after the next test that ends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tests.support.guard_site import realpath_guard
from tests.support.guard_site.realpath_guard import LOG_ENV, REAL_PATHS, RealPathAccess

SITE_DIR = os.path.dirname(os.path.abspath(realpath_guard.__file__))

__all__ = ["REAL_PATHS", "Guard", "RealPathAccess", "session", "unguarded_env"]


def _existing() -> set[str]:
    # lstat raises no audit event: looking does not trip the hook.
    return {path for path in REAL_PATHS if os.path.lexists(path)}


class Guard:
    """The guard of one test session; see the module's docstring."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self._log_read = 0
        self._existing = _existing()

    def take_problems(self) -> list[str]:
        """What was touched since the last call, one line each (empty: nothing); forgets it."""
        problems = ["this process: %s" % what for what in realpath_guard.refused]
        realpath_guard.refused.clear()
        with open(self.log_path, "rb") as f:
            f.seek(self._log_read)
            data = f.read()
        self._log_read += len(data)
        problems += data.decode("utf-8", "replace").splitlines()
        existing = _existing()
        problems += ["%s appeared" % p for p in sorted(existing - self._existing)]
        problems += ["%s disappeared" % p for p in sorted(self._existing - existing)]
        self._existing = existing
        return problems


def report(problems: list[str]) -> str:
    """The failure message for ``problems`` (from Guard.take_problems)."""
    return (
        "the test touched the real daemons' paths (%s); give every program explicit paths:\n  %s"
        % (", ".join(REAL_PATHS), "\n  ".join(problems))
    )


@contextmanager
def session() -> Iterator[Guard]:
    """Guard this process and its children until the end of the block (the in-process hook stays
    installed, audit hooks cannot be removed, but it then only records and refuses)."""
    fd, log_path = tempfile.mkstemp(prefix="ovmd-test-guard-", suffix=".log")
    os.close(fd)
    os.chmod(log_path, 0o622)  # children that drop root (to test permissions) record there too
    saved = {k: os.environ.get(k) for k in (LOG_ENV, "PYTHONPATH")}
    os.environ[LOG_ENV] = log_path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE_DIR, saved["PYTHONPATH"]]))
    realpath_guard.install()
    try:
        yield Guard(log_path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.unlink(log_path)


def unguarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the guard's variables: for a child that is itself a guarded test session
    (its refusals must not count against the test that runs it)."""
    out = {k: v for k, v in env.items() if k != LOG_ENV}
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    if paths:
        out["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        out.pop("PYTHONPATH", None)
    return out
