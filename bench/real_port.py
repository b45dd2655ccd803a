"""Round trip through a REAL virtio-serial port: the guest agent in a QEMU guest (software
emulation), pinged from the host over QEMU's unix socket, next to the same agent on a raw pty.

Run by hand, never in CI:

    .venv/bin/python bench/real_port.py [--count 200] [--rounds 3]

Boots the end-to-end test guest (tests/e2e/guest_image.py builds and caches it; the agent starts
at boot), then per round: p50/p90 of COUNT sequential pings through the port (after a RESYNC +
hello, as the bridge does), and the same through a raw pty to a host `ovmd --daemon`. Then the real
bridge (`hostbridge`) on the same port, through its API's unix socket, on one keep-alive
connection: COUNT sends of 1 KiB (`POST /v1/vms/VM/messages`, answered once the guest has stored
and fsync'd it; the bridge's outbox commit included) and COUNT queries (`GET /v1/vms/VM/keys/KEY`).
Prints the image build time and size, the boot time (QEMU start -> the agent answered a hello
through the port) and the medians over the rounds. The two ping figures differ in more than the
channel: the guest runs Debian's Python 3.11 without orjson under TCG emulation, the pty agent runs
natively with the venv's interpreter. Quote the ratio from one run; the machine is shared.
"""

import argparse
import json
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

from tests.e2e.qemu_bridge import VM, Bridge, UnixHTTP


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


def api_times(conn, method, path, body, count):
    """Seconds per request of COUNT identical requests on one keep-alive connection."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    times = []
    for _ in range(count):
        t = time.perf_counter()
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        reply = resp.read()
        times.append(time.perf_counter() - t)
        if resp.status != 200:
            raise SystemExit("%s %s: %d %s" % (method, path, resp.status, reply[:200]))
    return times


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
    proc = master = bridge = None
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

        bridge = Bridge(workdir, guest.agent_socket).start()
        bridge.wait_synced()
        conn = UnixHTTP(bridge.api)
        send_path = "/v1/vms/%s/messages" % VM
        body = {"key": "bench.send", "value": "v" * 1024}
        api_times(conn, "POST", send_path, body, 10)  # warm up, and the key exists for queries
        query_path = "/v1/vms/%s/keys/bench.send" % VM
        sends, queries = [], []
        for _ in range(args.rounds):
            sends.append(summary(api_times(conn, "POST", send_path, body, args.count)))
            queries.append(summary(api_times(conn, "GET", query_path, None, args.count)))
        conn.close()
        print(
            "the bridge's API on the real port, %d requests x %d rounds:"
            % (args.count, args.rounds)
        )
        for name, rows in (("send 1 KiB (delivered)", sends), ("query", queries)):
            print(
                "  %-24s p50 %.3f ms, p90 %.3f ms"
                % (
                    name,
                    statistics.median(p for p, _ in rows) * 1e3,
                    statistics.median(p for _, p in rows) * 1e3,
                )
            )
    finally:
        if bridge is not None:
            bridge.kill()
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
