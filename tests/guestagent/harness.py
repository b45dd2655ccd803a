"""Real parts for integration tests of the guest daemon: a raw pty as the channel, the daemon as a
subprocess, a host peer on the pty's master, local clients on the unix socket, and a notify socket.

    from tests.guestagent.harness import Daemon, Host, LocalClient, NotifySocket

    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()                                  # RESYNC + hello, waits for its own reply
        reply = host.request(Set, key="k", value="v", seq=1)
        with daemon.client() as c:
            assert c.request(Get, key="k").value == "v"

Everything waits with a deadline (generous: the machine is shared) and never sleeps as an assert.
The pieces the bridge's tests use too (the agent as a process, waiting, ptys) are in tests/support.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import time

from ovmproto.codec import Reader, encode
from ovmproto.framing import Resync
from ovmproto.handshake import Handshake
from ovmproto.messages import Changed, Err, Item, Ok
from tests.support.agent import Agent
from tests.support.closing import Closing
from tests.support.ptys import open_raw_pty, point_link
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import TIMEOUT, HarnessTimeout


class _Peer(Closing):
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


class NotifySocket(Closing):
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


class Daemon(Agent):
    """The real daemon (tests.support.agent.Agent) with clients of its local socket."""

    def client(self) -> LocalClient:
        """A LocalClient connected to the daemon."""
        return LocalClient(self.socket)


def cache_state(c):
    """Everything a guestagent.cache.Cache holds, as plain data, to compare two caches."""
    return (
        c.gid,
        c.gseq,
        c.epoch,
        c.hseq,
        [(e.key, e.value, e.ts, e.origin) for e in c.entries()],
        [(e.value, e.ts) for e in c.events()],
    )
