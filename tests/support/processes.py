"""Programs under test as child processes: the environment they get, their log, stopping them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping

from tests.support.closing import Closing
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import TIMEOUT, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
# systemd hands these to a service; a test run from one must not pass its own on to a daemon.
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
)


def script(name: str) -> str:
    """The path of one of this environment's commands (ovmd, vmmessage...), as users run it."""
    return os.path.join(os.path.dirname(PYTHON), name)


def child_env(
    extra: Mapping[str, str] | None = None,
    pythonpath: Iterable[str] = (),
    drop_prefixes: Iterable[str] = (),
) -> dict[str, str]:
    """This process's environment for a child, without systemd's variables and those starting
    with one of ``drop_prefixes``; ``pythonpath`` goes before the inherited PYTHONPATH (which
    carries the test guard, see tests/support/guard.py, and must stay), then ``extra`` applies."""
    dropped = tuple(drop_prefixes)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SYSTEMD_VARIABLES and not (dropped and k.startswith(dropped))
    }
    paths = [*pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def accepts(path: str) -> bool:
    """Whether something listens on the unix socket ``path`` (a stale socket file refuses)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Process(Closing):
    """A program under test as a child process, run from the repository root with its output in a
    log file; its own short directory (``dir``) holds the log and whatever a subclass puts there.

    Subclasses give command(). ``env`` is added to child_env() at start(), ``pythonpath`` goes
    first on PYTHONPATH (after the repository root, so that ``python -m`` finds the tree).
    start() may follow stop() or kill() again: the directory stays until close().
    """

    def __init__(self, env: Mapping[str, str] | None = None, pythonpath: Iterable[str] = ()):
        self.dir = short_tempdir()
        self.log_path = os.path.join(self.dir, "log")
        self.env = dict(env or {})
        self.pythonpath = list(pythonpath)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(self.env, pythonpath=[*self.pythonpath, ROOT]),
                cwd=ROOT,
                close_fds=True,
            )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``text`` is in the log."""
        what = "%r in the log of %s" % (text, type(self).__name__)
        wait_for(lambda: text in self.log(), timeout, what=what)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = TIMEOUT) -> int | None:
        """SIGTERM, then wait; the exit status (None if it never started)."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                "%s ignored SIGTERM for %.1fs" % (type(self).__name__, timeout)
            ) from None

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def wakeups(self) -> int:
        """Context switches so far (each sleep and wake counts one)."""
        with open("/proc/%d/status" % self.pid) as f:
            return sum(int(line.split()[1]) for line in f if line.endswith("ctxt_switches\n"))

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far (from /proc/PID/stat)."""
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Process:
        return self.start()
