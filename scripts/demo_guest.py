"""Demo: a real ovmd guest agent on a raw pty, answering a host peer built on ovmproto.

Run through scripts/demo.sh (which installs everything first). Prints each step as it happens.
"""

import os
import select
import subprocess
import sys
import tempfile
import termios
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ovmproto.codec import Reader, encode  # noqa: E402
from ovmproto.handshake import Handshake  # noqa: E402
from ovmproto.messages import Changed, Get, Ok, Set  # noqa: E402

BIN = os.path.join(os.path.dirname(sys.executable), "ovmd")


class HostPeer:
    """The host's end of the channel: the pty master, speaking the wire protocol."""

    def __init__(self, master):
        self.fd = master
        self.reader = Reader()
        self.pending = []
        self.next_id = 1

    def send(self, data):
        os.write(self.fd, data)

    def receive(self, want, timeout=10.0):
        """Return the first message for which want(msg) is true; print announcements on the way."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.pending:
                if want(msg):
                    self.pending.remove(msg)
                    return msg
            if time.monotonic() > deadline:
                raise SystemExit("demo: no answer from the guest agent within %.0f s" % timeout)
            if select.select([self.fd], [], [], 0.2)[0]:
                for ev in self.reader.feed(os.read(self.fd, 65536)):
                    if isinstance(ev, Changed):
                        say(
                            "host",
                            "the guest announced: %s %s (origin %s, change #%d)"
                            % (ev.op, ev.key, ev.origin, ev.gseq),
                        )
                    elif not isinstance(ev, Exception):
                        self.pending.append(ev)

    def request(self, make):
        rid = self.next_id
        self.next_id += 1
        self.send(encode(make(rid)))
        return self.receive(lambda m: getattr(m, "id", None) == rid)


def say(who, text):
    print("%-6s| %s" % (who, text), flush=True)


def ovmd(sock, *args):
    out = subprocess.run(
        [BIN] + list(args),
        env=dict(os.environ, OVMD_SOCKET=sock),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shown = [a if len(a) <= 40 else "%s...(%d chars)" % (a[:12], len(a)) for a in args]
    say("guest", "$ ovmd %s   (exit %d)" % (" ".join(shown), out.returncode))
    for line in out.stdout.splitlines():
        print("      |   " + line, flush=True)


def main():
    work = tempfile.mkdtemp(prefix="ovmd-demo-")
    master, slave = os.openpty()
    path = os.ttyname(slave)
    tty.setraw(master, termios.TCSANOW)
    tty.setraw(slave, termios.TCSANOW)  # TCSANOW: TCSAFLUSH would discard what the host wrote
    sock = os.path.join(work, "ovmd.sock")
    say("demo", "starting the guest agent on the pty %s (local socket %s)" % (path, sock))
    log = open(os.path.join(work, "ovmd.log"), "w")
    agent = subprocess.Popen(
        [
            BIN,
            "--daemon",
            "--channel",
            path,
            "--socket",
            sock,
            "--state-dir",
            os.path.join(work, "state"),
            "-d",
            "1",
        ],
        stderr=log,
    )
    # Hold the slave open too: a pty master reads EIO whenever no process has the slave open,
    # which would race with the agent opening it.
    try:
        host = HostPeer(master)
        hs = Handshake(request_id=0, nonce=os.urandom(8).hex(), epoch="demo-epoch")
        host.send(b"stale bytes from an earlier connection")  # dropped by the resync byte
        host.send(hs.opening())
        hello = host.receive(lambda m: hs.accept(m) is not None)
        result = hs.accept(hello)
        say(
            "host",
            "synced with %s: protocol v%d, cache %s, %d changes so far"
            % (result.agent, result.version, result.gid, result.gseq),
        )

        reply = host.request(lambda rid: Set(id=rid, seq=1, key="foo", value="bar"))
        say(
            "host",
            "sent foo=bar as message #1: acknowledged (%s)"
            % ("ok" if type(reply) is Ok else reply.msg),
        )
        reply = host.request(lambda rid: Set(id=rid, seq=1, key="foo", value="bar"))
        say(
            "host",
            "redelivered message #1 (as after a reconnect): duplicate=%s, not applied twice"
            % reply.dup,
        )

        ovmd(sock, "-p", "mykey=myvalue")
        host.request(lambda rid: Get(id=rid, key="mykey"))  # reads the announcement on the way
        ovmd(sock, "-l")
        ovmd(sock, "-g", "mykey")
        ovmd(sock, "-r", "mykey")
        ovmd(sock, "-l")
        ovmd(sock, "-p", "newkey=newvalue")
        ovmd(sock, "-l", "--json")
        ovmd(sock, "-g", "nosuchkey")
        ovmd(sock, "-p", "k" * 257 + "=v")

        reply = host.request(lambda rid: Get(id=rid, key="newkey"))
        say(
            "host",
            "queried newkey: %r, set by the %s %.1f s ago"
            % (reply.value, reply.origin, time.time() - reply.ts),
        )
    finally:
        agent.terminate()
        code = agent.wait(10)
        os.close(master)
        os.close(slave)
        log.close()
        say("demo", "guest agent stopped (exit %d); its log is %s" % (code, log.name))


if __name__ == "__main__":
    main()
