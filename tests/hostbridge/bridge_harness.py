"""Real parts for the bridge's integration tests: guest agents (`python -m guestagent.daemon`),
the bridge as a process (`python -m hostbridge.daemon`), a QEMU stand-in for unix channels, and a
scripted hostile guest. Everything waits with a deadline; nothing sleeps as an assert.

(Named bridge_harness, not harness: tests/guestagent/harness.py is imported as `harness`, and
pytest's default import mode keeps one module per basename.)

    with Agent(channel=path) as agent:               # a real ovmd on the pty the bridge made
        agent.wait_ready()
        agent.local(Get, key="k")                     # its local socket, as `ovmd -g` would
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = sys.executable
OVMD = os.path.join(os.path.dirname(PYTHON), "ovmd")  # the console script, as users run it
TIMEOUT = 15.0  # generous: the machine is shared and has 2 cores


class HarnessTimeout(AssertionError):
    pass


def short_tempdir() -> str:
    return tempfile.mkdtemp(prefix="hb-", dir="/tmp")


def wait_for(condition, timeout=TIMEOUT, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessTimeout("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


async def async_wait_for(condition, timeout=TIMEOUT, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessTimeout("timed out after %.1fs waiting for %s" % (timeout, what))
        await asyncio.sleep(interval)


def _clean_env(extra=None):
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    env["PYTHONPATH"] = ROOT
    env.update(extra or {})
    return env


class _Proc:
    def __init__(self):
        self.dir = short_tempdir()
        self.log_path = os.path.join(self.dir, "log")
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # added to the cleaned environment (e.g. NOTIFY_SOCKET)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_clean_env(self.env),
                cwd=ROOT,
                close_fds=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout=TIMEOUT):
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("%s ignored SIGTERM" % type(self).__name__)

    def kill(self):
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def rss_kb(self) -> int:
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def close(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class Agent(_Proc):
    """A real guest agent on ``channel``; its state survives stop()/kill() and start() again."""

    def __init__(self, channel: str):
        super().__init__()
        self.channel = channel
        self.socket = os.path.join(self.dir, "ovmd.sock")
        self.state_dir = os.path.join(self.dir, "state")

    def command(self):
        return [
            PYTHON,
            "-m",
            "guestagent.daemon",
            "--channel",
            self.channel,
            "--socket",
            self.socket,
            "--state-dir",
            self.state_dir,
            "--config",
            "/nonexistent",
            "-d",
            "1",
        ]

    def wait_ready(self, timeout=TIMEOUT):
        import socket as _socket

        def ready():
            if not self.running:
                raise AssertionError("agent exited:\n" + self.log())
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False
            finally:
                s.close()

        wait_for(ready, timeout, what="the agent's socket")
        return self

    def ovmd(self, *args) -> subprocess.CompletedProcess:
        """Run the `ovmd` CLI against this agent."""
        return subprocess.run(
            [OVMD, "--socket", self.socket, "--config", "/nonexistent", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_clean_env(),
            cwd=ROOT,
        )

    def cache_file_bytes(self) -> bytes:
        out = b""
        for name in os.listdir(self.state_dir):
            with open(os.path.join(self.state_dir, name), "rb") as f:
                out += f.read()
        return out


class BridgeProc(_Proc):
    """The bridge daemon as a process, with VMs given as flags; its database survives restarts."""

    def __init__(self, vms: dict[str, str], db: str | None = None, args=()):
        super().__init__()
        self.vms = vms
        self.db = db or os.path.join(self.dir, "bridge.sqlite3")
        self.api_socket = os.path.join(self.dir, "api.sock")
        self.args = list(args)

    def command(self):
        cmd = [
            PYTHON,
            "-m",
            "hostbridge.daemon",
            "--no-discover",
            "--db",
            self.db,
            "--api-socket",
            self.api_socket,
            "-d",
            "2",
        ]
        for name, channel in self.vms.items():
            cmd += ["--vm", "%s=%s" % (name, channel)]
        return cmd + self.args

    def wait_ready(self, timeout=TIMEOUT):
        def ready():
            if not self.running:
                raise AssertionError("bridge exited:\n" + self.log())
            return " ready" in self.log()

        wait_for(ready, timeout, what="the bridge to be ready")
        return self

    def wait_log(self, text, timeout=TIMEOUT):
        wait_for(lambda: text in self.log(), timeout, what="%r in the bridge's log" % text)


class QemuStandIn(_Proc):
    """Listens on ``socket`` like QEMU's chardev and relays to a pty linked at ``link``."""

    def __init__(self, socket_path: str, link: str):
        super().__init__()
        self.socket = socket_path
        self.link = link

    def command(self):
        return [PYTHON, os.path.join(HERE, "qemu_standin.py"), self.socket, self.link]

    def wait_ready(self, timeout=TIMEOUT):
        wait_for(lambda: "ready" in self.log(), timeout, what="the QEMU stand-in")
        return self

    def clients(self) -> int:
        try:
            with open(self.socket + ".clients") as f:
                return len(f.read().split())
        except OSError:
            return 0


class Hostile(_Proc):
    """A misbehaving guest program on a pty channel (see hostile_guest.py for the modes)."""

    def __init__(self, channel: str, mode: str):
        super().__init__()
        self.channel = channel
        self.mode = mode

    def command(self):
        return [PYTHON, os.path.join(HERE, "hostile_guest.py"), self.channel, self.mode]

    def wait_ready(self, timeout=TIMEOUT):
        wait_for(lambda: "ready" in self.log(), timeout, what="the hostile guest")
        return self
