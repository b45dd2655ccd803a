"""A stand-in for QEMU's chardev socket whose host side moves, as a live migration moves it:

    python migrating_standin.py CONTROL LINK SOCKET

Like qemu_standin.py it relays bytes between a unix socket and a raw pty whose guest end is linked
at LINK (a real guest agent opens LINK as its port, and keeps it through the migration: its
process, cache and hseq survive, as in a real live migration, where the guest never notices). It
serves one client at a time per socket (a second connect() waits in the backlog until the first
closes), and drops the bytes the guest writes while no client is connected, as QEMU does.

The host side starts at SOCKET (the source host's channel, in its libvirt directory layout:
<dir>/domain-<id>-<name>/com.oracle.ovmd). Commands, one line each on the unix socket CONTROL,
each answered "ok" (or "error: ...") once done:

    listen P      QEMU on the destination made its channel socket P (paused, incoming): P
                  accepts a client, which is counted, but nothing is relayed through P yet (what
                  such a client writes waits in the socket, as QEMU reads nothing for a paused
                  guest); P's directory is made
    pause         the guest is paused: nothing the client writes is read any more (it waits in
                  the socket, and is lost with it if the socket goes away, as with the source
                  QEMU at the end of a migration); the test stops the agent (SIGSTOP) as well
    resume        the guest runs again: what waits in the relaying socket is read
    move P        the guest's port is behind P now: the client and the listener of the current
                  socket are closed, that socket and its directory removed (the source QEMU is
                  gone, with what its socket held), and P relays (listened first if it was not);
                  a client already connected at P is relayed from now on, once not paused
    unlisten P    QEMU at P is gone (a failed incoming migration): its client and listener
                  closed, its socket and directory removed
    where         answers the socket that relays ("-" when none)

Each accepted client appends its socket's path as one line to CONTROL + ".clients", for the tests
to count connects per host. It prints "ready" when listening and exits on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import termios
import tty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.support.ptys import open_raw_pty, point_link


class StandIn:
    def __init__(self, control: str, link: str, first: str) -> None:
        # The guest end's descriptor stays open here for good, as QEMU holds it.
        self.master, self._guest_fd, guest_end = open_raw_pty()
        tty.setraw(self.master, termios.TCSANOW)
        point_link(link, guest_end)
        self.counts = control + ".clients"
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}
        self.clients: dict[str, socket.socket] = {}
        self.active: str | None = None
        self.paused = False
        self._pending: dict[socket.socket, bytes] = {}  # control connections' partial lines
        self.control = self._bind(control)
        self.sel.register(self.control, selectors.EVENT_READ, ("control", control))
        self.sel.register(self.master, selectors.EVENT_READ, ("guest", None))
        self.listen(first)
        self.active = first

    # -- sockets ---------------------------------------------------------------------------------

    @staticmethod
    def _bind(path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(8)
        return s

    def listen(self, path: str) -> None:
        if path in self.listeners:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        server = self._bind(path)
        self.listeners[path] = server
        self.sel.register(server, selectors.EVENT_READ, ("accept", path))

    def close_client(self, path: str) -> None:
        client = self.clients.pop(path, None)
        if client is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client)
        client.close()
        server = self.listeners.get(path)
        if server is not None:  # the next client waiting in its backlog may come in
            self.sel.register(server, selectors.EVENT_READ, ("accept", path))

    def unlisten(self, path: str) -> None:
        """QEMU at ``path`` is gone: libvirt removes the domain's directory with its socket."""
        self.close_client(path)
        server = self.listeners.pop(path, None)
        if server is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(server)
            server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
        if self.active == path:
            self.active = None

    def relay(self, on: bool) -> None:
        """Read (or stop reading) the relaying socket's client."""
        client = self.clients.get(self.active) if self.active is not None else None
        if client is None:
            return
        if on:
            with contextlib.suppress(KeyError):
                self.sel.get_key(client)
                return  # read already
            self.sel.register(client, selectors.EVENT_READ, ("client", self.active))
        else:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(client)

    def move(self, path: str) -> None:
        self.listen(path)
        if self.active is not None and self.active != path:
            self.unlisten(self.active)
        self.active = path
        self.relay(not self.paused)

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self.relay(not paused)

    # -- events ----------------------------------------------------------------------------------

    def accept(self, path: str) -> None:
        server = self.listeners[path]
        client, _ = server.accept()
        self.sel.unregister(server)  # one client at a time: later ones wait in the backlog
        self.clients[path] = client
        with open(self.counts, "a") as f:
            f.write(path + "\n")
        if path == self.active:
            self.relay(not self.paused)
        # Else the guest is paused behind this socket: its bytes wait in the socket's buffer.

    def from_client(self, path: str) -> None:
        client = self.clients[path]
        try:
            data = client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close_client(path)
            return
        view = memoryview(data)
        while view:  # the guest end is held open, so this only waits for the guest to read
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                selectors.DefaultSelector().select(0.05)

    def from_guest(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        client = self.clients.get(self.active) if self.active is not None else None
        if data and client is not None:  # no client: QEMU drops what the guest writes
            try:
                client.sendall(data)
            except OSError:
                pass

    def command(self, line: str) -> str:
        verb, _, arg = line.strip().partition(" ")
        try:
            if verb == "where":
                return self.active or "-"
            if verb in ("pause", "resume"):
                self.pause(verb == "pause")
                return "ok"
            if not arg.startswith("/"):
                return "error: %s needs an absolute path" % verb
            if verb == "listen":
                self.listen(arg)
            elif verb == "move":
                self.move(arg)
            elif verb == "unlisten":
                self.unlisten(arg)
            else:
                return "error: unknown command %r" % verb
        except OSError as e:
            return "error: %s" % e
        return "ok"

    def from_control(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(conn)
            self._pending.pop(conn, None)
            conn.close()
            return
        buf = self._pending.get(conn, b"") + data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            answer = self.command(line.decode("utf-8", "replace"))
            with contextlib.suppress(OSError):
                conn.sendall(answer.encode("utf-8") + b"\n")
        self._pending[conn] = buf

    def run(self) -> None:
        print("ready", flush=True)
        while True:
            for key, _ in self.sel.select():
                kind, path = key.data
                if kind == "accept" and path in self.listeners and path not in self.clients:
                    self.accept(path)
                elif kind == "client" and path in self.clients:
                    self.from_client(path)
                elif kind == "guest":
                    self.from_guest()
                elif kind == "control":
                    conn, _ = self.control.accept()
                    self.sel.register(conn, selectors.EVENT_READ, ("command", conn))
                elif kind == "command":
                    self.from_control(path)

    def close(self) -> None:
        for path in list(self.listeners):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def main(control: str, link: str, first: str) -> None:
    standin = StandIn(control, link, first)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        standin.run()
    finally:
        standin.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
