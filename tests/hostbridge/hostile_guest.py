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
"""

import os
import sys
import termios
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ovmproto.codec import Reader, encode
from ovmproto.handshake import answer_hello
from ovmproto.messages import Changed, Err, Hello, List, Ok, Set


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


def main(channel, mode):
    fd = os.open(channel, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
    print("ready", flush=True)
    if mode == "garbage":
        junk = bytes(range(0x80, 0xFF)) * 64 + b"\n"
        while True:
            write_all(fd, junk)
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
