"""The host channel as bytes: find the virtio-serial port, open it, read, write, close.

No protocol and no policy here (hostlink.py decides what EOF or an error means). Facts this code
is written to (docs/virtio-serial.md):

- the real port is a plain character device, not a tty: never use termios on it;
- only one process may hold it open: a second open() gets EBUSY;
- while no host is connected, read() returns b"" (EOF) at once and poll() reports HUP, forever;
- a pty (the stand-in in tests) is a tty: it must be put in raw mode with TCSANOW, since the
  default TCSAFLUSH discards input the host already wrote;
- a channel may also be a serial tty (`channel = /dev/ttyS1`: QEMU's isa-serial; or a Xen
  console, /dev/hvcN): raw as a pty, and with modem control and flow control off (set_raw).
  pyserial is not used: it refuses the non-tty virtio port and discards pending input at open.
"""

from __future__ import annotations

import errno
import os
import termios
import tty

DEFAULT_PATH = "/dev/virtio-ports/com.oracle.ovmd"
PORT_NAME = "com.oracle.ovmd"
SYSFS_PORTS = "/sys/class/virtio-ports"
READ_SIZE = 65536  # the real port returns at most 4096 bytes a read; a pty a little more

_OPEN_FLAGS = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def find_port(
    default: str = DEFAULT_PATH, sysfs: str = SYSFS_PORTS, dev: str = "/dev", name: str = PORT_NAME
) -> str | None:
    """The port's device path: the udev link if present, else the vport whose sysfs name matches.

    Return None when neither exists (the port may not be there yet: the caller retries).
    """
    if os.path.exists(default):
        return default
    try:
        ports = sorted(os.listdir(sysfs))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(sysfs, port, "name"), "rb") as f:
                if f.read().strip() == name.encode("ascii"):
                    return os.path.join(dev, port)
        except OSError:
            continue
    return None


class Channel:
    """One open descriptor on the port (or a pty). Non-blocking; read/write never block."""

    __slots__ = ("path", "fd", "is_tty")

    def __init__(self, path: str, fd: int, is_tty: bool) -> None:
        self.path = path
        self.fd = fd
        self.is_tty = is_tty

    @classmethod
    def open(cls, path: str) -> Channel:
        """Open ``path``; raise OSError (ENOENT, EBUSY, EACCES...) for the caller to judge."""
        fd = os.open(path, _OPEN_FLAGS)
        try:
            is_tty = os.isatty(fd)
            if is_tty:
                set_raw(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, is_tty)

    def read(self) -> bytes | None:
        """Bytes read; b"" at EOF; None when nothing is waiting. Raise OSError (e.g. EIO).

        (The host link reads ``fd`` itself: its read is on the path of every request.)"""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, data: bytes | bytearray) -> int:
        """Bytes written (0 when the port would block). Raise OSError for real errors."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass  # nothing to recover: the descriptor is gone either way

    def __repr__(self) -> str:
        return "Channel(%r, fd=%d%s)" % (self.path, self.fd, ", tty" if self.is_tty else "")


def set_raw(fd: int) -> None:
    """Make the tty ``fd`` a clean 8-bit pipe, at once (TCSANOW: TCSAFLUSH would discard what the
    host already wrote).

    Raw: no echo, no CR/LF translation, no line length limit, 0x04 is a byte. For a serial port
    (an emulated UART, /dev/ttyS1, or a Xen console, /dev/hvcN) also: CLOCAL, so that no modem
    line can block an open or hang the line up; no hardware or software flow control; HUPCL off,
    so that closing does not drop the line. On a pty these change nothing that matters.
    """
    tty.setraw(fd, termios.TCSANOW)
    attrs = termios.tcgetattr(fd)
    cflag = attrs[2]
    cflag |= termios.CLOCAL | termios.CREAD
    cflag &= ~(termios.HUPCL | termios.CRTSCTS)
    attrs[2] = cflag
    attrs[0] &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def is_hangup(err: OSError) -> bool:
    """True for the errors that mean the peer side of a tty went away."""
    return err.errno in (errno.EIO, errno.ENXIO, errno.EPIPE, errno.ECONNRESET)
