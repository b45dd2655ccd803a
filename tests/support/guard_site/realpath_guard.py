"""The test guard's hook: no test may touch the real daemons' files (REAL_PATHS), because the suite
runs as root on machines that may run the real ovmd or hostbridge.

install() adds an audit hook (PEP 578) that refuses, with RealPathAccess (a PermissionError), every
open, directory operation, socket connect or bind and sqlite3 connect whose path is one of
REAL_PATHS or below one, before it happens; each refusal is also recorded (in ``refused`` and, when
a log file is given, as a line there), so that a program that swallows the error is still caught.

Standalone on purpose (os and sys only, Python 3.9 syntax): every Python child of the tests imports
it at start-up, under its own name (realpath_guard, from this directory on PYTHONPATH); the pytest
process imports it as tests.support.guard_site.realpath_guard.
"""

import os
import sys

LOG_ENV = "REALPATH_GUARD_LOG"
REAL_PATHS = (
    "/etc/ovmd.conf",
    "/run/ovmd",
    "/run/hostbridge",
    "/etc/hostbridge",
    "/var/lib/hostbridge",
)

# Audit events that name a path, and where it is among their arguments.
_PATH_ARGUMENTS = {
    "open": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.link": (0, 1),
    "os.listdir": (0,),
    "os.mkdir": (0,),
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.rmdir": (0,),
    "os.scandir": (0,),
    "os.symlink": (1,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "socket.bind": (1,),
    "socket.connect": (1,),
    "sqlite3.connect": (0,),
}

refused = []  # "EVENT PATH" of every refusal in this process
_state = {"installed": False, "log": None}


class RealPathAccess(PermissionError):
    """A test (or a program it started) touched a real daemon's path."""


def real_path(value):
    """The absolute, normalised path ``value`` names if it is one of REAL_PATHS or below one."""
    if isinstance(value, (int, tuple)) or value is None:
        return None  # a descriptor, an internet address
    try:
        path = os.fsdecode(value)
    except TypeError:
        return None
    if not path or path[0] == "\0":
        return None  # an abstract socket
    if path[0] != "/":
        try:
            path = os.path.join(os.getcwd(), path)
        except OSError:
            return None  # the working directory is gone: nothing relative to it is ours
    path = "/" + os.path.normpath(path).lstrip("/")
    if path.startswith("/var/run/"):
        path = path[len("/var") :]  # /var/run is a link to /run
    for real in REAL_PATHS:
        if path == real or path.startswith(real + "/"):
            return path
    return None


def _hook(event, args):
    positions = _PATH_ARGUMENTS.get(event)
    if positions is None:
        return
    for i in positions:
        if i >= len(args):
            continue
        path = real_path(args[i])
        if path is not None:
            _refuse(event, path)


def _refuse(event, path):
    what = "%s %s" % (event, path)
    refused.append(what)
    log = _state["log"]
    if log is not None:
        argv = " ".join(getattr(sys, "argv", None) or ["?"])
        line = "pid %d (%s): %s\n" % (os.getpid(), argv[:200], what)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    raise RealPathAccess(
        "test guard: refused %s: tests must not touch the real daemons' paths (%s); "
        "give the program explicit paths" % (what, ", ".join(REAL_PATHS))
    )


def install(log=None):
    """Guard this process from now on (audit hooks cannot be removed: for the rest of its life);
    refusals are also appended to the file ``log``, if given."""
    _state["log"] = log
    if not _state["installed"]:
        sys.addaudithook(_hook)
        _state["installed"] = True
