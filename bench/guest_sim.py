"""Many simulated guests in one process, for the bridge benchmark (bench/bridge.py).

    .venv/bin/python bench/guest_sim.py --dir DIR --count 1000 [--keys 4] [--extra 1]
                                        [--stats FILE] [--first N] [--layout flat|libvirt]
                                        [--control SOCK] [--record PREFIX]

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

For a pool of hosts (bench/pool.py), which finds its VMs by discovery and migrates them:

- --first N: the guests are vm<N>, vm<N+1>, ... (several simulators, one per host, each its own
  names); --layout libvirt: each socket where libvirt binds a channel, so that the bridge's
  discovery finds and names it: DIR/domain-<k>-<name>/com.oracle.ovmd, k = 1, 2, ...
- --control SOCK: one command a line, answered "ok" (or "error: ...") once done:
    listen NAME PATH   the destination's QEMU made NAME's channel socket PATH (paused, incoming):
                       PATH listens, but is not accepted from until `move` (a connect waits in the
                       backlog, as QEMU reads nothing for a paused guest)
    move NAME          the guest runs behind PATH now: its connection and socket at the source are
                       closed, that socket and its domain directory removed (the source QEMU is
                       gone), PATH accepted from. The guest keeps its cache, epoch and hseq, as a
                       live-migrated guest does. The time of the move is kept, with the time the
                       first bytes from a host came in after it and the first set or del
    dump FILE          write what guests recorded (below) to FILE as JSON
- --record PREFIX: every host set of a key starting with PREFIX that the guest applied is counted
  by value, so that a load generator giving each such send a value of its own can tell lost
  messages (never applied) and duplicates (applied twice) apart. Always counted, per guest:
  re-deliveries the seq check dropped (seq <= hseq: answered ok dup), and epoch changes.
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


CHANNEL_NAME = "com.oracle.ovmd"  # hostbridge.discovery's: the channel libvirt binds per domain


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
        "incoming",
        "moved_at",
        "first_frame",
        "first_set",
        "moves",
        "dups",
        "epoch_changes",
        "applied",
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
        # Migration (--control): the incoming (socket, path) between `listen` and `move`; the
        # monotonic times of the last move, of the first host bytes and the first host set or del
        # after it (CLOCK_MONOTONIC is the machine's: a controller's times compare with these).
        self.incoming = None
        self.moved_at = None
        self.first_frame = None
        self.first_set = None
        self.moves = 0
        self.dups = 0  # host sets or dels dropped by the seq check (seq <= hseq)
        self.epoch_changes = 0  # a hello with another epoch than the one followed (not the first)
        self.applied = None  # --record: value -> times applied, for the recorded keys


def _bind(path):
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    s.setblocking(False)
    return s


class _Control:
    """One connection on the control socket: its partial line and its answers."""

    __slots__ = ("conn", "buf")

    def __init__(self, conn):
        self.conn = conn
        self.buf = bytearray()


class Sim:
    def __init__(
        self, directory, count, keys, extra, first=0, layout="flat", control=None, record=None
    ):
        self.sel = selectors.DefaultSelector()
        self.guests = []
        self.by_name = {}
        self.counts = {}
        self.connects = 0
        self.running = True
        self.layout = layout
        self.control_path = control
        self.control = None
        self.record = record
        for i in range(count + extra):
            name = guest_name(first + i)
            if layout == "libvirt":
                path = os.path.join(directory, "domain-%d-%s" % (i + 1, name), CHANNEL_NAME)
            else:
                path = os.path.join(directory, "g%04d.sock" % i)
            g = Guest(name, path, keys)
            if record is not None:
                g.applied = {}
            self.guests.append(g)
            self.by_name[name] = g

    def listen(self):
        for g in self.guests:
            if self.layout == "libvirt":
                os.makedirs(os.path.dirname(g.path), exist_ok=True)
            g.listener = _bind(g.path)
            self.sel.register(g.listener, selectors.EVENT_READ, (self._accept, g))
        if self.control_path is not None:
            self.control = _bind(self.control_path)
            self.sel.register(self.control, selectors.EVENT_READ, (self._control_accept, None))

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
            if g.moved_at is not None and g.first_frame is None:
                g.first_frame = time.monotonic()
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
                    if g.epoch is not None:
                        g.epoch_changes += 1
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
        if g.moved_at is not None and g.first_set is None:
            g.first_set = time.monotonic()
        if msg.seq is not None and msg.seq <= g.hseq:
            g.dups += 1
            self._send(g, encode(Ok(id=msg.id, seq=msg.seq, dup=True)))
            return
        ts = time.time()
        if msg.seq is not None:
            g.hseq = msg.seq
        if g.applied is not None and type(msg) is Set and msg.key.startswith(self.record):
            g.applied[msg.value] = g.applied.get(msg.value, 0) + 1
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

    # -- migration and the control socket ---------------------------------------------------------

    def _control_accept(self, _none, mask):
        assert self.control is not None  # registered by listen() only with --control
        try:
            conn, _ = self.control.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, (self._control_io, _Control(conn)))

    def _control_io(self, c, mask):
        try:
            data = c.conn.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            c.buf += data
        while b"\n" in c.buf:
            line, _, rest = bytes(c.buf).partition(b"\n")
            c.buf[:] = rest
            answer = self._command(line.decode("utf-8", "replace").split())
            try:
                # Answers are a few bytes and the controller waits for each: a blocking send of
                # so little to a unix socket does not wait.
                c.conn.setblocking(True)
                c.conn.sendall(answer.encode("utf-8") + b"\n")
                c.conn.setblocking(False)
            except OSError:
                data = b""
                break
        if not data:
            self.sel.unregister(c.conn)
            c.conn.close()

    def _command(self, words):
        verb, args = (words[0], words[1:]) if words else ("", [])
        try:
            if verb == "listen" and len(args) == 2:
                self._listen_incoming(self.by_name[args[0]], args[1])
            elif verb == "move" and len(args) == 1:
                self._move(self.by_name[args[0]])
            elif verb == "dump" and len(args) == 1:
                self._dump(args[0])
            elif verb != "ping" or args:
                return "error: unknown command"
        except KeyError:
            return "error: no such guest"
        except (OSError, ValueError) as e:
            return "error: %s" % e
        return "ok"

    def _listen_incoming(self, g, path):
        if g.incoming is not None:
            raise ValueError("a migration to %s is under way" % g.incoming[1])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        g.incoming = (_bind(path), path)

    def _move(self, g):
        """The switch-over: the guest is behind its incoming socket now (see the docstring)."""
        if g.incoming is None:
            raise ValueError("no incoming socket: listen first")
        if g.conn is not None:
            self.sel.unregister(g.conn)
            g.conn.close()
            g.conn = None
            g.reader = None
            g.out.clear()
            g.want_write = False
            g.synced = False
        else:
            self.sel.unregister(g.listener)
        g.listener.close()
        try:
            os.unlink(g.path)
            if self.layout == "libvirt":
                os.rmdir(os.path.dirname(g.path))  # libvirt removes the domain's directory
        except OSError:
            pass
        g.listener, g.path = g.incoming
        g.incoming = None
        self.sel.register(g.listener, selectors.EVENT_READ, (self._accept, g))
        g.moves += 1
        g.moved_at = time.monotonic()
        g.first_frame = g.first_set = None

    def _dump(self, path):
        guests = {}
        for g in self.guests:
            if not (g.moves or g.dups or g.epoch_changes or g.applied):
                continue
            guests[g.name] = {
                "path": g.path,
                "moves": g.moves,
                "moved_at": g.moved_at,
                "first_frame": g.first_frame,
                "first_set": g.first_set,
                "dups": g.dups,
                "epoch_changes": g.epoch_changes,
                "hseq": g.hseq,
                "applied": g.applied,
            }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"guests": guests, "requests": self.counts, "connects": self.connects}, f)
        os.replace(tmp, path)

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
            sockets = [(g.listener, g.path)] + ([g.incoming] if g.incoming else [])
            for s, path in sockets:
                if s is None:
                    continue
                s.close()
                try:
                    os.unlink(path)
                    if self.layout == "libvirt":
                        os.rmdir(os.path.dirname(path))
                except OSError:
                    pass
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.control_path)
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
    ap.add_argument("--first", type=int, default=0, help="the first guest's number (default 0)")
    ap.add_argument(
        "--layout",
        choices=("flat", "libvirt"),
        default="flat",
        help="flat: DIR/g0000.sock...; libvirt: DIR/domain-K-NAME/%s, as discovery finds them"
        % CHANNEL_NAME,
    )
    ap.add_argument("--control", metavar="SOCK", help="a control socket: listen, move, dump")
    ap.add_argument(
        "--record",
        metavar="PREFIX",
        help="count the values of applied host sets of keys starting with PREFIX (for dump)",
    )
    args = ap.parse_args(argv)
    sim = Sim(
        args.dir,
        args.count,
        args.keys,
        args.extra,
        args.first,
        args.layout,
        args.control,
        args.record,
    )

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
