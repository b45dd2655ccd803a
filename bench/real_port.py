"""Round trip through a REAL virtio-serial port: the guest agent in a QEMU guest (software
emulation), pinged from the host over QEMU's unix socket, next to the same agent on a raw pty.

Run by hand, never in CI:

    .venv/bin/python bench/real_port.py [--count 200] [--rounds 3]

Boots the end-to-end test guest (tests/e2e/guest_image.py builds and caches it; the agent starts
at boot), then per round: p50/p90 of COUNT sequential pings through the port (after a RESYNC +
hello, as the bridge does), and the same through a raw pty to a host `ovmd --daemon`. Prints the
image build time and size, the boot time (QEMU start -> the agent answered a hello through the
port) and the medians over the rounds. The two sides differ in more than the channel: the guest
runs Debian's Python 3.11 without orjson under TCG emulation, the pty agent runs natively with the
venv's interpreter. Quote the ratio from one run; the machine is shared.
"""

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import termios
import time
import tty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "e2e")]

from guest_image import build_image
from qemu import boot, ping_over, ping_round_trips


def pty_agent(workdir):
    """A host ovmd on a raw pty: (process, master fd)."""
    master, slave = os.openpty()
    tty.setraw(master, termios.TCSANOW)
    tty.setraw(slave, termios.TCSANOW)
    path = os.ttyname(slave)
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guestagent.daemon",
            "--channel",
            path,
            "--socket",
            os.path.join(workdir, "pty-ovmd.sock"),
            "--state-dir",
            os.path.join(workdir, "pty-state"),
            "--config",
            "/nonexistent",
            "-d",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    return proc, master


def pty_pings(master, count):
    def read(wait):
        r, _, _ = select.select([master], [], [], wait)
        return os.read(master, 65536) if r else None

    def write(data):
        while data:
            data = data[os.write(master, data) :]

    return ping_over(write, read, count)


def summary(times):
    times = sorted(times)
    return statistics.median(times), times[int(len(times) * 0.9)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    t = time.monotonic()
    image = build_image()
    print(
        "image %s: %.1f MB (kernel + initrd), %s"
        % (
            image.key,
            image.size / 1e6,
            "built in %.1f s" % image.build_seconds
            if image.build_seconds
            else "from the cache (%.1f s to check)" % (time.monotonic() - t),
        )
    )
    workdir = tempfile.mkdtemp(prefix="real-port-", dir="/tmp")
    guest = boot(image, workdir, agent=True)
    proc = master = None
    try:
        ping_round_trips(guest.agent_socket, 1, timeout=120)
        print(
            "boot: %.1f s from QEMU start to the agent answering through the port"
            % (time.monotonic() - guest.started)
        )
        proc, master = pty_agent(workdir)
        port, pty = [], []
        for _ in range(args.rounds):
            port.append(summary(ping_round_trips(guest.agent_socket, args.count)))
            pty.append(summary(pty_pings(master, args.count)))
        port_p50 = statistics.median(p for p, _ in port)
        pty_p50 = statistics.median(p for p, _ in pty)
        print(
            "ping round trip, %d pings x %d rounds (medians of the rounds):"
            % (args.count, args.rounds)
        )
        print(
            "  real port (QEMU guest): p50 %.3f ms, p90 %.3f ms"
            % (port_p50 * 1e3, statistics.median(p for _, p in port) * 1e3)
        )
        print(
            "  raw pty (host agent):   p50 %.3f ms, p90 %.3f ms"
            % (pty_p50 * 1e3, statistics.median(p for _, p in pty) * 1e3)
        )
        print("  ratio port / pty (p50): %.1fx" % (port_p50 / pty_p50))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if master is not None:
            os.close(master)
        guest.kill()
        if args.keep:
            print("work directory kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
