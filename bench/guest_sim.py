"""Many simulated guests in one process, for the bridge benchmark (bench/bridge.py).

    .venv/bin/python bench/guest_sim.py --dir DIR --count 1000 [--keys 4] [--extra 1]
                                        [--stats FILE]

Listens on DIR/g0000.sock ... one unix socket per guest, the way QEMU's chardev does with
server=on: the bridge connects to each; one client at a time per socket (while one is served, the
listener is not polled, so a second connect() waits in the backlog until the first closes, as QEMU
does). Behind each socket a guest speaks the real guest side of the protocol with ovmproto's
Reader and encode:

- hello: follows a new epoch from hseq 0, answers with ovmproto.handshake.answer_hello (RESYNC + ok)
- ping, get (ok with key/value/ts/origin, or err not_found), list (one item per key, then ok count)
- set/del from the host with seq dedup (seq <= hseq: ok dup, not applied again), answered ok, then
  a `changed` announcement; every change bumps gseq
- anything else with an id: err (unknown_type / bad_request), as the real agent

Each guest starts with --keys keys set with origin "guest" (keys bench.k0..; values are
"v-<guest name>-<j>", so a load generator can check every answer), hence gseq = --keys.
Guest names are vm0000, vm0001, ...; the --extra guests after --count are for a direct
(bridge-less) round trip yardstick.

One thread, one epoll selector, non-blocking sockets, no asyncio: the simulator must cost little CPU
next to the bridge on a 2-core machine. Prints "ready N" on stdout once every socket listens; on
SIGTERM or SIGINT writes per-request-type counts to --stats (JSON) and exits 0.
"""

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # ovmproto from this tree

from ovmproto import PROTOCOL_VERSION
from ovmproto.codec import Reader, encode
from ovmproto.errors import ProtocolError
from ovmproto.framing import Resync
from ovmproto.handshake import answer_hello
from ovmproto.messages import (
    Changed,
    Delete,
    Err,
    Get,
    Hello,
    Item,
    List,
    Ok,
    Ping,
    Set,
)

AGENT = "guest_sim 0.1"
READ_SIZE = 65536
OUT_LIMIT = 4 * 1024 * 1024  # a host that stops reading: drop its connection past this


def guest_name(i):
    return "vm%04d" % i


def key_name(j):
    return "bench.k%d" % j


def value_for(name, j):
    return "v-%s-%d" % (name, j)


class Guest:
    """One simulated guest: its cache, its sequence positions, and at most one host connection."""

    __slots__ = (
        "name",
        "path",
        "listener",
        "conn",
        "reader",
        "out",
        "want_write",
        "data",
        "gid",
        "gseq",
        "epoch",
        "hseq",
        "synced",
    )

    def __init__(self, name, path, keys):
        self.name = name
        self.path = path
        self.listener = None
        self.conn = None
        self.reader = None
        self.out = bytearray()
        self.want_write = False
        now = time.time()
        # key -> (value, ts, origin); dicts keep insertion order, which is the set order of `list`.
        self.data = {key_name(j): (value_for(name, j), now, "guest") for j in range(keys)}
        self.gid = os.urandom(8).hex()
        self.gseq = keys
        self.epoch = None
        self.hseq = 0
        self.synced = False


class Sim:
    def __init__(self, directory, count, keys, extra):
        self.sel = selectors.DefaultSelector()
        self.guests = []
        self.counts = {}
        self.connects = 0
        self.running = True
        for i in range(count + extra):
            name = guest_name(i)
            path = os.path.join(directory, "g%04d.sock" % i)
            self.guests.append(Guest(name, path, keys))

    def listen(self):
        for g in self.guests:
            if os.path.exists(g.path):
                os.unlink(g.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(g.path)
            s.listen(16)
            s.setblocking(False)
            g.listener = s
            self.sel.register(s, selectors.EVENT_READ, (self._accept, g))

    # -- connections ------------------------------------------------------------------------------

    def _accept(self, g, mask):
        try:
            conn, _ = g.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        g.conn = conn
        g.reader = Reader()
        g.out.clear()
        g.want_write = False
        g.synced = False
        self.connects += 1
        # One client at a time, as QEMU: later connects wait in the backlog until this one closes.
        self.sel.unregister(g.listener)
        self.sel.register(conn, selectors.EVENT_READ, (self._io, g))

    def _drop(self, g):
        if g.conn is None:
            return
        self.sel.unregister(g.conn)
        g.conn.close()
        g.conn = None
        g.reader = None
        g.out.clear()
        g.want_write = False
        g.synced = False
        self.sel.register(g.listener, selectors.EVENT_READ, (self._accept, g))

    def _io(self, g, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush(g)
            if g.conn is None:
                return
        if mask & selectors.EVENT_READ:
            try:
                data = g.conn.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(g)
                return
            self._feed(g, data)
            if g.conn is not None and g.out:
                self._flush(g)

    def _send(self, g, data):
        if g.conn is None:
            return
        g.out += data
        if len(g.out) > OUT_LIMIT:
            self._drop(g)

    def _flush(self, g):
        while g.out:
            try:
                n = g.conn.send(g.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(g)
                return
            del g.out[:n]
        want = bool(g.out)
        if want != g.want_write:
            g.want_write = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(g.conn, events, (self._io, g))

    # -- the protocol, guest side -----------------------------------------------------------------

    def _count(self, what):
        self.counts[what] = self.counts.get(what, 0) + 1

    def _feed(self, g, data):
        for ev in g.reader.feed(data):
            t = type(ev)
            if t is Get:
                self._count("get")
                entry = g.data.get(ev.key)
                if entry is None:
                    self._send(g, encode(Err(id=ev.id, code="not_found", msg="no such key")))
                else:
                    self._send(
                        g,
                        encode(
                            Ok(id=ev.id, key=ev.key, value=entry[0], ts=entry[1], origin=entry[2])
                        ),
                    )
            elif t is Hello:
                self._count("hello")
                if ev.epoch is not None and ev.epoch != g.epoch:
                    g.epoch, g.hseq = ev.epoch, 0  # a new host stream starts over
                g.out.clear()  # replies to requests before this hello: the host ignores them
                self._send(
                    g, answer_hello(ev, AGENT, g.gid, g.gseq, g.epoch, g.hseq, PROTOCOL_VERSION)
                )
                g.synced = True
            elif t is Ping:
                self._count("ping")
                self._send(g, encode(Ok(id=ev.id)))
            elif t is List:
                self._count("list")
                frames = [
                    encode(Item(id=ev.id, key=k, value=v[0], ts=v[1], origin=v[2]))
                    for k, v in g.data.items()
                ]
                frames.append(encode(Ok(id=ev.id, count=len(g.data))))
                self._send(g, b"".join(frames))
            elif t is Set or t is Delete:
                self._count(t.TYPE)
                self._host_change(g, ev)
            elif t is Resync:
                g.synced = False  # a hello follows: announce nothing until it is answered
            elif isinstance(ev, ProtocolError):
                self._count("bad_frame")
                rid = getattr(ev, "request_id", None)
                if rid is not None:
                    self._send(g, encode(Err(id=rid, code=ev.code, msg=ev.message)))
            elif getattr(ev, "id", None) is not None and t not in (Ok, Err, Item):
                self._count("refused")
                self._send(
                    g,
                    encode(
                        Err(
                            id=ev.id,
                            code="bad_request",
                            msg="%r is not accepted from the host" % t.TYPE,
                        )
                    ),
                )

    def _host_change(self, g, msg):
        if not g.synced:
            self._send(g, encode(Err(id=msg.id, code="busy", msg="send hello first")))
            return
        if msg.seq is not None and msg.seq <= g.hseq:
            self._send(g, encode(Ok(id=msg.id, seq=msg.seq, dup=True)))
            return
        ts = time.time()
        if msg.seq is not None:
            g.hseq = msg.seq
        if type(msg) is Set:
            g.data.pop(msg.key, None)  # a set moves the key to the end, as the real cache
            g.data[msg.key] = (msg.value, ts, "host")
            g.gseq += 1
            change = Changed(
                gseq=g.gseq, op="set", ts=ts, origin="host", key=msg.key, value=msg.value
            )
            self._send(g, encode(Ok(id=msg.id, seq=msg.seq)))
        else:
            found = g.data.pop(msg.key, None) is not None
            change = None
            if found:
                g.gseq += 1
                change = Changed(gseq=g.gseq, op="del", ts=ts, origin="host", key=msg.key)
            self._send(g, encode(Ok(id=msg.id, seq=msg.seq, found=found)))
        if change is not None:
            self._send(g, encode(change))  # the host hears its ok first, then the change

    # -- the loop ---------------------------------------------------------------------------------

    def run(self):
        while self.running:
            try:
                events = self.sel.select(1.0)
            except InterruptedError:
                continue
            for key, mask in events:
                fn, g = key.data
                fn(g, mask)

    def close(self):
        for g in self.guests:
            if g.conn is not None:
                g.conn.close()
            if g.listener is not None:
                g.listener.close()
                try:
                    os.unlink(g.path)
                except OSError:
                    pass
        self.sel.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="directory for the guests' sockets")
    ap.add_argument("--count", type=int, default=1000, help="guests (default 1000)")
    ap.add_argument("--keys", type=int, default=4, help="keys pre-set in each guest (origin guest)")
    ap.add_argument(
        "--extra", type=int, default=0, help="more guests after --count, for yardsticks"
    )
    ap.add_argument("--stats", metavar="FILE", help="write request counts here (JSON) on exit")
    args = ap.parse_args(argv)
    sim = Sim(args.dir, args.count, args.keys, args.extra)

    def stop(signum, frame):
        sim.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sim.listen()
        sys.stdout.write("ready %d\n" % len(sim.guests))
        sys.stdout.flush()
        sim.run()
    finally:
        sim.close()
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump({"requests": sim.counts, "connects": sim.connects}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
