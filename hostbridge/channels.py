"""Transports to a guest's port: bytes only, no protocol.

    channel = open_channel(VmSpec.channel, limits)   # "unix:PATH" or "pty:PATH"
    await channel.connect()      # returns once the link is usable; retries with backoff
    data = await channel.read()  # raises ChannelClosed when the link is lost
    channel.write(frame)         # never blocks; raises ChannelFull / ChannelClosed
    channel.disconnect()         # drop this link (connect() again later)
    await channel.aclose()       # for good

unix: QEMU/libvirt's chardev socket. Exactly one connection, held for as long as it lives (QEMU
serves one client at a time and silently hands the port to a second one when the first closes).
QEMU keeps the socket connected whether or not a guest program has the port open: the session's
hello retries and keepalive find out whether an agent answers.

pty: we allocate the pair, put both ends in raw mode (TCSANOW: TCSAFLUSH would discard input) and
link the guest end at PATH, as QEMU's `-chardev pty` does. We do not keep the guest end open, so
the master reads EIO while no guest program has it open; poll() then reports POLLHUP at once,
forever, so we never wait on the fd in that state: connect() probes with a read every
PTY_PROBE_INTERVAL seconds instead (a few wakeups a second per absent guest, no spinning).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import termios
import tty

from .errors import BridgeError

log = logging.getLogger(__name__)

READ_SIZE = 65536
PTY_PROBE_INTERVAL = 0.2
RECONNECT_FIRST = 0.05


class ChannelClosed(BridgeError):
    code = "agent_not_connected"


class ChannelFull(BridgeError):
    """The guest does not read: bytes towards it passed the write buffer limit."""

    code = "busy"


class Channel:
    kind = ""

    def __init__(self, path: str, write_limit: int = 1024 * 1024) -> None:
        self.path = path
        self.write_limit = write_limit
        self.connects = 0  # successful connects, for the "reconnects" counter
        self._closed = False

    @property
    def spec(self) -> str:
        return "%s:%s" % (self.kind, self.path)

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    async def read(self) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self._closed = True
        self.disconnect()

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.spec)


class UnixChannel(Channel):
    kind = "unix"

    def __init__(self, path: str, write_limit: int = 1024 * 1024, backoff_max: float = 5.0) -> None:
        super().__init__(path, write_limit)
        self.backoff_max = backoff_max
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._failures = 0  # connect failures in a row (drives the backoff and the log level)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        delay = RECONNECT_FIRST
        while not self._closed:
            try:
                # limit: the StreamReader pauses the socket beyond this, which bounds our buffer
                # and pushes back on a flooding guest.
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=READ_SIZE
                )
            except OSError as e:
                self._failures += 1
                level = logging.INFO if self._failures == 1 else logging.DEBUG
                log.log(level, "cannot connect to %s: %s; retrying", self.path, e.strerror or e)
                # Full jitter: a host restart must not make 1,000 bridges' sessions retry in step.
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.backoff_max)
                continue
            self._failures = 0
            self.connects += 1
            return
        raise ChannelClosed("channel %s is closed" % self.spec)

    async def read(self) -> bytes:
        reader = self._reader
        if reader is None or not self.connected:
            raise ChannelClosed("not connected to %s" % self.path)
        try:
            data = await reader.read(READ_SIZE)
        except OSError as e:
            self.disconnect()
            raise ChannelClosed("lost %s: %s" % (self.path, e.strerror or e)) from None
        if not data:
            self.disconnect()
            raise ChannelClosed("%s closed the connection" % self.path)
        return data

    def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ChannelClosed("not connected to %s" % self.path)
        if writer.transport.get_write_buffer_size() + len(data) > self.write_limit:
            raise ChannelFull(
                "the guest behind %s is not reading (%d bytes pending)"
                % (self.path, writer.transport.get_write_buffer_size())
            )
        writer.write(data)

    def disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class PtyChannel(Channel):
    kind = "pty"

    def __init__(self, path: str, write_limit: int = 1024 * 1024) -> None:
        super().__init__(path, write_limit)
        self._master: int | None = None
        self.slave_name: str | None = None
        self._present = False
        self._pending = b""  # bytes the presence probe read
        self._out = bytearray()
        self._writing = False
        self._open_pair()

    def _open_pair(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(master, termios.TCSANOW)
            tty.setraw(slave, termios.TCSANOW)
            self.slave_name = os.ttyname(slave)
            os.set_blocking(master, False)
            os.set_inheritable(master, False)
            tmp = "%s.%d.tmp" % (self.path, os.getpid())
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(self.slave_name, tmp)
            os.replace(tmp, self.path)  # atomic: an agent never sees a missing or half link
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # The raw settings live with the pair; the guest program opens the slave by PATH.
        os.close(slave)
        self._master = master
        log.debug("pty %s -> %s", self.path, self.slave_name)

    @property
    def connected(self) -> bool:
        return self._present

    async def connect(self) -> None:
        while not self._closed and self._master is not None:
            try:
                data = os.read(self._master, READ_SIZE)
            except BlockingIOError:
                data = b""
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                await asyncio.sleep(PTY_PROBE_INTERVAL)  # nobody has the guest end open
                continue
            self._present = True
            self.connects += 1
            self._pending = data  # bytes read by the probe belong to the new link
            return
        raise ChannelClosed("channel %s is closed" % self.spec)

    async def read(self) -> bytes:
        if not self._present or self._master is None:
            raise ChannelClosed("no guest program has %s open" % self.path)
        pending = self._pending
        if pending:
            self._pending = b""
            return pending
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(self._master, READ_SIZE)
            except BlockingIOError:
                fut = loop.create_future()
                fd = self._master
                loop.add_reader(fd, _wake, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(fd)
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self.disconnect()
                raise ChannelClosed("the guest program closed %s" % self.path)
            return data

    def write(self, data: bytes) -> None:
        if not self._present or self._master is None:
            raise ChannelClosed("no guest program has %s open" % self.path)
        if len(self._out) + len(data) > self.write_limit:
            raise ChannelFull(
                "the guest behind %s is not reading (%d bytes pending)"
                % (self.path, len(self._out))
            )
        self._out += data
        self._flush()

    def _flush(self) -> None:
        master = self._master
        if master is None:
            return  # closed: aclose() removed the writer before it closed the fd
        while self._out:
            try:
                n = os.write(master, self._out)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno not in (errno.EIO, errno.EPIPE):
                    raise
                self._out.clear()  # the guest end is closed: its bytes are lost, like QEMU's
                break
            del self._out[:n]
        loop = asyncio.get_running_loop()
        if self._out and not self._writing:
            loop.add_writer(master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            loop.remove_writer(master)
            self._writing = False

    def disconnect(self) -> None:
        self._present = False
        self._pending = b""
        self._out.clear()
        if self._writing and self._master is not None:
            asyncio.get_running_loop().remove_writer(self._master)
        self._writing = False

    async def aclose(self) -> None:
        await super().aclose()
        if self._master is not None:
            os.close(self._master)
            self._master = None
        try:
            if os.path.islink(self.path) and os.readlink(self.path) == self.slave_name:
                os.unlink(self.path)
        except OSError as e:
            log.warning("cannot remove the link %s: %s", self.path, e.strerror)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def open_channel(spec: str, write_limit: int = 1024 * 1024, backoff_max: float = 5.0) -> Channel:
    """A Channel for "unix:PATH" or "pty:PATH" (config.parse_channel validated it)."""
    kind, _, path = spec.partition(":")
    if kind == "unix":
        return UnixChannel(path, write_limit, backoff_max)
    if kind == "pty":
        return PtyChannel(path, write_limit)
    raise BridgeError("unknown channel kind %r" % kind)


__all__ = ["Channel", "ChannelClosed", "ChannelFull", "PtyChannel", "UnixChannel", "open_channel"]
