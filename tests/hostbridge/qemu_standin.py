"""A stand-in for QEMU's chardev socket, run as its own process by the bridge tests:

    python qemu_standin.py SOCKET LINK

Listens on the unix socket SOCKET and relays bytes to and from a raw pty whose guest end is linked
at LINK (a real guest agent opens LINK as its port). Like QEMU it serves one client at a time (a
second connect() succeeds but waits until the first closes), holds bytes written while no guest
program has the port open (it keeps the guest end open itself), and drops bytes the guest writes
while no client is connected. It prints "ready" when listening and exits on SIGTERM.
It also appends one line per accepted client to SOCKET + ".clients", for the tests to count.
"""

import os
import selectors
import signal
import socket
import sys
import termios
import tty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.support.ptys import open_raw_pty, point_link


def main(sock_path, link):
    # The guest end's descriptor stays open here for good, as QEMU holds it: bytes written while no
    # guest program has the port open wait in the pty.
    master, _guest_fd, guest_end = open_raw_pty()
    tty.setraw(master, termios.TCSANOW)
    point_link(link, guest_end)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, "accept")
    sel.register(master, selectors.EVENT_READ, "guest")
    client = None
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "accept" and client is None:
                client, _ = server.accept()
                sel.unregister(server)  # one client at a time: later ones wait in the backlog
                sel.register(client, selectors.EVENT_READ, "client")
                with open(sock_path + ".clients", "a") as f:
                    f.write("client\n")
            elif key.data == "client":
                try:
                    data = client.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(client)
                    client.close()
                    client = None
                    sel.register(server, selectors.EVENT_READ, "accept")
                    continue
                view = memoryview(data)
                while view:  # the guest end is held open, so this only waits for the guest
                    try:
                        view = view[os.write(master, view) :]
                    except BlockingIOError:
                        selectors.DefaultSelector().select(0.05)
            elif key.data == "guest":
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if data and client is not None:
                    try:
                        client.sendall(data)
                    except OSError:
                        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
