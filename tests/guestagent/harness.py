"""Real parts for integration tests of the guest daemon: a raw pty as the channel, the daemon as a
subprocess, a host peer on the pty's master, local clients on the unix socket, and a notify socket.

    from harness import Daemon, Host, LocalClient, NotifySocket

    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()                                  # RESYNC + hello, waits for its own reply
        reply = host.request(Set, key="k", value="v", seq=1)
        with daemon.client() as c:
            assert c.request(Get, key="k").value == "v"

Everything waits with a deadline (generous: the machine is shared) and never sleeps as an assert.
``import harness`` works from test modules in tests/guestagent/ (pytest puts their directory on
sys.path; do not add a tests/conftest.py: tests/ on sys.path would shadow the packages).
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import tty

from ovmproto.codec import Reader, encode
from ovmproto.framing import Resync
from ovmproto.handshake import Handshake
from ovmproto.messages import Changed, Err, Item, Ok

PYTHON = sys.executable
TIMEOUT = 10.0  # default deadline of every wait: generous for a loaded 2-core machine


class HarnessTimeout(AssertionError):
    """A wait ran out of time (an assertion failure for pytest)."""


def wait_for(condition, timeout=TIMEOUT, interval=0.02, what="condition"):
    """Poll ``condition()`` until it returns a true value (returned) or raise HarnessTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessTimeout("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def short_tempdir():
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="ovmd-", dir="/tmp")


def open_raw_pty():
    """(master fd, slave fd, slave path) of a new pty whose guest end is raw (TCSANOW)."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def point_link(link, target):
    """Atomically make the symlink ``link`` point at ``target``."""
    tmp = "%s.new-%d" % (link, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, link)


class _Peer:
    """Protocol over a descriptor: request ids, decoding, and a pool of messages not yet taken.

    Subclasses set ``fd`` and implement ``_read()`` (bytes, b"" on EOF, None if nothing yet).
    ``changed`` collects every Changed notification seen, in order, whoever was waiting.
    """

    def __init__(self):
        self.reader = Reader()
        self.pending = []  # decoded messages not yet returned (never Changed)
        self.changed = []  # every Changed seen
        self.events = []  # every event in arrival order, for tests of stream details
        self.eof = False
        self._next_id = 0

    def next_id(self):
        self._next_id += 1
        return self._next_id

    def poll(self, timeout):
        """Read once (waiting up to ``timeout``); return True when something arrived."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = self._read()
        if data is None:
            return False
        if not data:
            self.eof = True
            return False
        for event in self.reader.feed(data):
            self.events.append(event)
            if type(event) is Changed:
                self.changed.append(event)
            elif type(event) is not Resync:
                self.pending.append(event)
        return True

    def send(self, data):
        """Write bytes or a message, all of it."""
        if not isinstance(data, (bytes, bytearray)):
            data = encode(data)
        view = memoryview(data)
        deadline = time.monotonic() + TIMEOUT
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            if n == 0:
                if time.monotonic() > deadline:
                    raise HarnessTimeout("peer does not read")
                select.select([], [self.fd], [], 0.1)
            view = view[n:]

    def take(self, match, timeout=TIMEOUT, what="a message"):
        """Remove and return the first pending message for which ``match(msg)`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.pending):
                if match(msg):
                    return self.pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise HarnessTimeout(
                    "no %s within %.1fs (eof=%s, pending=%r)"
                    % (what, timeout, self.eof, self.pending[-5:])
                )
            self.poll(min(left, 0.5))

    def reply(self, request_id, timeout=TIMEOUT):
        """The Ok or Err answering ``request_id`` (Items of a listing stay pending)."""
        return self.take(
            lambda m: type(m) in (Ok, Err) and m.id == request_id,
            timeout,
            "reply to id %d" % request_id,
        )

    def request(self, cls, reply_timeout=TIMEOUT, **fields):
        """Send ``cls(id=<fresh>, **fields)`` and return its Ok or Err.

        (``reply_timeout`` is how long to wait; ``timeout`` is the Wait message's own field.)
        """
        request_id = self.next_id()
        self.send(cls(id=request_id, **fields))
        return self.reply(request_id, reply_timeout)

    def listing(self, cls, reply_timeout=TIMEOUT, **fields):
        """Send a List (or Events) request; return (items, final Ok or Err)."""
        request_id = self.next_id()
        self.send(cls(id=request_id, **fields))
        final = self.reply(request_id, reply_timeout)
        items = [m for m in self.pending if type(m) is Item and m.id == request_id]
        self.pending = [m for m in self.pending if not (type(m) is Item and m.id == request_id)]
        return items, final

    def wait_changed(self, count=1, timeout=TIMEOUT):
        """Wait until at least ``count`` Changed notifications were seen; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.changed) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise HarnessTimeout("saw %d changed, wanted %d" % (len(self.changed), count))
            self.poll(min(left, 0.5))
        return list(self.changed)

    def drain(self, quiet=0.2):
        """Read until nothing arrives for ``quiet`` seconds."""
        while self.poll(quiet):
            pass


class Host(_Peer):
    """The host side of the channel: the master of a raw pty, reached by the daemon through the
    symlink ``link`` (re-pointed by reconnect(), as a new pty appears after the host returns)."""

    def __init__(self, link=None):
        super().__init__()
        self._dir = None
        if link is None:
            self._dir = short_tempdir()
            link = os.path.join(self._dir, "channel")
        self.link = link
        self.fd = self.slave = -1
        self._open()

    def _open(self):
        self.fd, self.slave, self.pty_path = open_raw_pty()
        point_link(self.link, self.pty_path)
        self.reader = Reader()
        self.pending = []
        self.eof = False

    def _read(self):
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""  # EIO: nobody holds the guest end

    def hello(self, epoch="epoch-1", nonce=None, timeout=TIMEOUT, garbage=b""):
        """Write ``garbage``, RESYNC and a hello; return the HelloResult of our own reply.

        Everything before that reply is discarded (it may be stale), as a real host does.
        """
        hs = Handshake(self.next_id(), nonce or os.urandom(8).hex(), epoch)
        self.pending = []
        self.send(garbage + hs.opening())
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.pending):
                result = hs.accept(msg)
                if result is not None:
                    del self.pending[: i + 1]
                    return result
            self.pending = []
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise HarnessTimeout("no hello reply within %.1fs" % timeout)
            self.poll(min(left, 0.5))

    def disconnect(self, keep_device=False):
        """The host goes away: close the pty's master (and our copy of the guest end).

        The link then points nowhere, so that a daemon retrying it cannot open an unrelated pty
        that happens to get the freed number (other tests on the machine make ptys too).
        With ``keep_device`` only the master closes: the guest end stays open here, so the
        device and the link remain and every reopen by the daemon hangs up at once.
        """
        if keep_device:
            os.close(self.fd)
            self.fd = -1
            return
        if self.fd >= 0:
            point_link(self.link, self.link + ".gone")
        for fd in (self.fd, self.slave):
            if fd >= 0:
                os.close(fd)
        self.fd = self.slave = -1

    def reconnect(self):
        """The host is back on a new pty; the link now points at it."""
        self.disconnect()
        self._open()

    def close(self):
        self.disconnect()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalClient(_Peer):
    """A program on the guest talking to the daemon's unix socket."""

    def __init__(self, path, timeout=TIMEOUT):
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()

    def _read(self):
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, directory=None):
        self._dir = short_tempdir() if directory is None else None
        self.path = os.path.join(directory or self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def env(self):
        return {"NOTIFY_SOCKET": self.path}

    def wait_for(self, line, timeout=TIMEOUT):
        """Wait for a datagram holding the line ``line`` (e.g. "READY=1"); return the datagram."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages:
                if line in msg.split("\n"):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessTimeout("no %r from the daemon; got %r" % (line, self.messages))
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.5))
            if ready:
                self.messages.append(self.sock.recv(4096).decode("utf-8"))

    def close(self):
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Daemon:
    """The real daemon as a subprocess (``python -m guestagent.daemon``), logging to a file.

    ``state_dir`` survives restarts of the same object (start() after kill() or stop()).
    """

    def __init__(self, channel, state_dir=None, socket_path=None, args=(), env=None):
        self._dir = short_tempdir()
        self.channel = channel
        self.state_dir = state_dir or os.path.join(self._dir, "state")
        self.socket = socket_path or os.path.join(self._dir, "ovmd.sock")
        self.log_path = os.path.join(self._dir, "daemon.log")
        self.args = list(args)
        self.env = dict(env or {})
        self.proc = None

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
        ] + self.args

    def start(self):
        env = dict(os.environ)
        for k in (
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "INVOCATION_ID",
        ):
            env.pop(k, None)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                close_fds=True,
            )
        return self

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=TIMEOUT):
        """Wait until the local socket accepts connections (the daemon listens before it opens
        the channel and before READY=1)."""

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    "daemon exited with %s:\n%s" % (self.proc.returncode, self.log())
                )
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False
            finally:
                s.close()

        wait_for(ready, timeout, what="the daemon's socket")
        return self

    def client(self):
        """A LocalClient connected to the daemon."""
        return LocalClient(self.socket)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout=TIMEOUT):
        """SIGTERM, then wait; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon ignored SIGTERM for %.1fs" % timeout)

    def kill(self):
        """SIGKILL, then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wakeups(self):
        """Context switches of the daemon's process so far (each sleep/wake counts one)."""
        counts = {}
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.endswith("ctxt_switches\n"):
                    name, value = line.split(":")
                    counts[name] = int(value)
        return sum(counts.values())

    def cpu_seconds(self):
        """User + system CPU time the daemon used so far (from /proc/PID/stat)."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
