"""A misbehaving guest program, run as its own process by the bridge's hostile-guest tests:

    python hostile_guest.py CHANNEL MODE

MODE:
  garbage    writes random non-UTF-8 bytes and newlines as fast as the channel takes them
  changed    answers the bridge's hello properly, then writes valid `changed` frames as fast as
             it can (a new key each time: it also tries to blow the mirror's quota)
  half       answers the hello, then writes half a frame and stops writing, forever
  noread     answers the hello, then never reads again (the bridge's writes pile up)
  restarted  answers the hello, then answers the first `set` with `err busy`, as an agent
             restarted behind QEMU's socket does (it has not seen a hello on its connection;
             QEMU tells the host nothing); then serves hellos and sets properly, printing
             "applied KEY SEQ" for every set it applies
  racylist   answers the hello with a new cache (gseq 0), then answers a `list` with its
             (empty) listing and, in the same write, a `changed` that sets a key (gseq 1): the
             change comes after the listing, and must not be lost to it
  badkeys    answers the hello and the first `list` with an empty cache, then announces keys
             the protocol forbids (ESC, CR, NUL, '=', too long, a value too long) between two
             legal ones, then answers every later `list` with the same mix of items

Two modes play QEMU's chardev socket instead: CHANNEL is a unix socket path they listen on, and
they append a line to CHANNEL + ".clients" for every connection they accept:
  acceptclose  accepts each connection and closes it at once
  syncdrop     accepts, answers the first hello, then closes
"""

import os
import socket
import sys
import termios
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ovmproto.codec import Reader, encode
from ovmproto.handshake import answer_hello
from ovmproto.messages import Changed, Err, Hello, Item, List, Ok, Set


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def events(fd):
    """Every event read from ``fd``, for ever."""
    reader = Reader()
    while True:
        yield from reader.feed(os.read(fd, 65536))


def answer_first_hello(fd):
    for ev in events(fd):
        if type(ev) is Hello:
            write_all(fd, answer_hello(ev, "hostile 0", "hostile-gid", 0, ev.epoch, 0))
            return


# (key, value) a guest may not announce, each refused for its own reason.
BAD_KEYS = [
    ("esc\x1b[2Jkey", "v"),
    ("cr\rkey", "v"),
    ("nul\x00key", "v"),
    ("eq=key", "v"),
    ("k" * 300, "v"),
    ("big.value", "x" * 9000),
]
GOOD_KEYS = [("good.one", "1"), ("good.two", "2")]


def listen_main(path, mode):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with open(path + ".clients", "a") as f:
            f.write("x\n")
        if mode == "syncdrop":
            conn.settimeout(5)
            reader = Reader()
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    hellos = [ev for ev in reader.feed(data) if type(ev) is Hello]
                    if hellos:
                        ev = hellos[0]
                        conn.sendall(answer_hello(ev, "hostile 0", "drop-gid", 0, ev.epoch, 0))
                        break
            except OSError:
                pass
        conn.close()


def announce_bad_keys(fd):
    """Answer the first `list` with an empty cache, then announce BAD_KEYS among GOOD_KEYS as
    changes 1..8; answer every later `list` with all of them."""
    gseq = 0
    for ev in events(fd):
        if type(ev) is Hello:
            write_all(fd, answer_hello(ev, "hostile 0", "badkeys-gid", gseq, ev.epoch, 0))
        elif type(ev) is List and gseq == 0:
            write_all(fd, encode(Ok(id=ev.id, count=0, gseq=0)))
            frames = []
            for key, value in BAD_KEYS[:3] + GOOD_KEYS[:1] + BAD_KEYS[3:] + GOOD_KEYS[1:]:
                gseq += 1
                change = Changed(
                    gseq=gseq, op="set", ts=time.time(), origin="guest", key=key, value=value
                )
                frames.append(encode(change))
            write_all(fd, b"".join(frames))
            print("announced %d" % gseq, flush=True)
        elif type(ev) is List:
            frames = [
                encode(Item(id=ev.id, key=key, value=value, ts=time.time(), origin="guest"))
                for key, value in BAD_KEYS + GOOD_KEYS
            ]
            write_all(fd, b"".join(frames) + encode(Ok(id=ev.id, count=len(frames), gseq=gseq)))


def main(channel, mode):
    if mode in ("acceptclose", "syncdrop"):
        listen_main(channel, mode)
    fd = os.open(channel, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
    print("ready", flush=True)
    if mode == "garbage":
        junk = bytes(range(0x80, 0xFF)) * 64 + b"\n"
        while True:
            write_all(fd, junk)
    if mode == "badkeys":
        announce_bad_keys(fd)
    answer_first_hello(fd)
    if mode == "changed":
        gseq = 0
        while True:
            batch = []
            for _ in range(100):
                gseq += 1
                batch.append(
                    encode(
                        Changed(
                            gseq=gseq,
                            op="set",
                            ts=time.time(),
                            origin="guest",
                            key="flood.%d" % gseq,
                            value="x" * 100,
                        )
                    )
                )
            write_all(fd, b"".join(batch))
    elif mode == "half":
        write_all(fd, b'{"t":"changed","gseq":1,"op":"set","ts":1,"origin":"guest","key":"k"')
        while True:
            time.sleep(3600)
    elif mode == "noread":
        while True:
            time.sleep(3600)
    elif mode == "restarted":
        serve_after_a_restart(fd)
    elif mode == "racylist":
        answer_a_list_then_change(fd)


def answer_a_list_then_change(fd):
    for ev in events(fd):
        if type(ev) is Hello:
            write_all(fd, answer_hello(ev, "hostile 0", "racy-gid", 0, ev.epoch, 0))
        elif type(ev) is List:
            late = Changed(
                gseq=1, op="set", ts=time.time(), origin="guest", key="late.key", value="late value"
            )
            write_all(fd, encode(Ok(id=ev.id, count=0, gseq=0)) + encode(late))


def serve_after_a_restart(fd):
    refused = False
    epoch, hseq = None, 0
    for ev in events(fd):
        if type(ev) is Hello:
            if ev.epoch != epoch:
                epoch, hseq = ev.epoch, 0
            write_all(fd, answer_hello(ev, "hostile 0", "hostile-gid", 0, epoch, hseq))
        elif type(ev) is Set and not refused:
            refused = True
            write_all(fd, encode(Err(id=ev.id, code="busy", msg="send hello first")))
        elif type(ev) is Set:
            if ev.seq > hseq:
                hseq = ev.seq
                print("applied %s %d" % (ev.key, ev.seq), flush=True)
            write_all(fd, encode(Ok(id=ev.id, seq=ev.seq)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
