"""The pool's forwarding hop alone: a query through a non-owner against the same through the owner.

Run by hand, never in CI:

    .venv/bin/python bench/forward_hop.py [--n 500] [--rounds 10] [--uvloop]

Two processes serve the real API (hostbridge.api: make_app and start, the TCP listener with its
admission, TLS and the pool token; the unix socket's app without middleware), each in front of a
stand-in bridge that answers a key's query from a dict, as the owner answers from its mirror:

  owner: the VM is its own; unix socket, and TLS on 127.0.0.1 with the pool token accepted;
  front: the VM is the owner's: every per-VM request goes through hostbridge.forward.

One client (this process, blocking sockets, keep-alive HTTP/1.1) asks the same query three ways,
in turns of N requests, the order reversed every other round:

  direct     over the owner's unix socket (bench/pool.py's "through the owner");
  owner-tls  over the owner's TLS listener with the pool token, as the front asks it;
  forwarded  over the front's unix socket (bench/pool.py's "through a non-owner").

For each: the p50 round trip, and the CPU each server process spent a request (from
/proc/PID/schedstat, so the other work of a shared machine is not counted). The difference
between direct and owner-tls is what TLS, TCP and authentication cost the owner; forwarded minus
owner-tls is the front (its own HTTP request cycle plus the forward). No PostgreSQL, no guests:
bench/pool.py measures the whole pool. With --uvloop (needs uvloop importable), a second pair of
processes on uvloop's event loop runs beside the first, in the same rounds.
"""

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

POOL_TOKEN = "bench-pool-token-0123456789abcdef"
QUERY = "/v1/vms/vm1/keys/bench.k"
WAYS = ("direct", "owner-tls", "forwarded")


def serve(role, workdir, owner_url, use_uvloop):
    """One server process until its stdin closes."""
    from hostbridge import api
    from hostbridge.forward import Forwarder
    from tests.hostbridge.fakes import FakeBridge

    class Bridge(FakeBridge):
        async def query(self, name, key, *, timeout=5.0, fresh=False):
            return self._get(name).key_value(key)  # no call log: it would grow for ever

        def local_guest(self, name):
            return None

    class Pool:
        """What hostbridge.api asks of hostbridge.pool.Pool."""

        def __init__(self):
            self.forwarder = None
            self.key = types.SimpleNamespace(api_token=lambda: POOL_TOKEN)

        def route(self, name, forwarded=False):
            return None if forwarded or role == "owner" else owner_url

        def owner_down(self, url):
            print("forward_hop: the owner did not answer", file=sys.stderr)

    bridge = Bridge(["vm1"])
    bridge.fake("vm1").keys["bench.k"] = ("v" * 32, time.time(), "guest")
    bridge.pool = Pool()
    tokens = os.path.join(workdir, "tokens")
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")

    async def main():
        if role == "front":
            bridge.pool.forwarder = Forwarder(POOL_TOKEN, cert, "front")
        config = types.SimpleNamespace(
            api_socket=os.path.join(workdir, role + ".sock"),
            api_socket_mode=0o600,
            api_group=None,
            api_tcp=("127.0.0.1", 0) if role == "owner" else None,
            tls_cert=cert,
            tls_key=key,
            tokens_file=tokens,
            users_file=None,
            query_timeout=5.0,
        )
        server = await api.start(api.make_app(bridge, config), config)
        port = server.tcp_addresses[0][1] if server.tcp_addresses else 0
        print(port, flush=True)
        done = asyncio.Event()
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), done.set)
        await done.wait()
        await server.close()
        if bridge.pool.forwarder is not None:
            await bridge.pool.forwarder.close()

    if use_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())


class Client:
    """Keep-alive HTTP/1.1 GETs of QUERY on one blocking socket."""

    def __init__(self, sock, headers=b""):
        self.sock = sock
        self.request = b"GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (QUERY.encode(), headers)

    def get(self):
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError("answer: %r" % head.split(b"\r\n", 1)[0])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += self.sock.recv(65536)
        return body


class Stack:
    """An owner and a front process, and the three clients."""

    def __init__(self, workdir, use_uvloop):
        self.dir = workdir
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
            + ["-keyout", os.path.join(workdir, "key.pem")]
            + ["-out", os.path.join(workdir, "cert.pem")]
            + ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        tokens = os.path.join(workdir, "tokens")
        with open(os.open(tokens, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("bench:%s\n" % ("b" * 32))
        self.procs = []
        port = self._start("owner", "-", use_uvloop)
        self._start("front", "https://127.0.0.1:%d" % port, use_uvloop)
        self.owner, self.front = (p.pid for p in self.procs)
        tls = ssl.create_default_context(cafile=os.path.join(workdir, "cert.pem"))
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.clients = {
            "direct": Client(self._unix("owner")),
            "owner-tls": Client(
                tls.wrap_socket(raw, server_hostname="127.0.0.1"),
                b"Authorization: Bearer %s\r\nX-Ovmd-Forwarded-By: bench\r\n" % POOL_TOKEN.encode(),
            ),
            "forwarded": Client(self._unix("front")),
        }
        answers = {c.get() for c in self.clients.values()}
        if len(answers) != 1:
            raise RuntimeError("the three ways answered differently: %r" % answers)

    def _start(self, role, owner_url, use_uvloop):
        argv = [sys.executable, __file__, "--serve", role, self.dir, owner_url]
        argv += ["--uvloop"] if use_uvloop else []
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the %s process did not start" % role)
        return int(line)

    def _unix(self, role):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(os.path.join(self.dir, role + ".sock"))
        return sock

    def stop(self):
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def cpu_us(pid):
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0]) / 1e3


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2], argv[3], "--uvloop" in argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="requests per turn (default 500)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    ap.add_argument("--uvloop", action="store_true", help="also a pair on uvloop's event loop")
    args = ap.parse_args(argv)
    loads = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="fwdhop-")
    stacks = {}
    try:
        for name in ("asyncio", "uvloop") if args.uvloop else ("asyncio",):
            os.mkdir(os.path.join(workdir, name))
            stacks[name] = Stack(os.path.join(workdir, name), name == "uvloop")
        for stack in stacks.values():
            for _ in range(300):  # warm-up: every connection open, every path taken
                for client in stack.clients.values():
                    client.get()
        figures = {}
        for r in range(args.rounds):
            plan = [(name, way) for name in stacks for way in WAYS]
            for name, way in plan if r % 2 == 0 else reversed(plan):
                stack = stacks[name]
                client = stack.clients[way]
                before = cpu_us(stack.owner), cpu_us(stack.front)
                times = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    client.get()
                    times.append(time.perf_counter() - t0)
                owner, front = cpu_us(stack.owner) - before[0], cpu_us(stack.front) - before[1]
                figures.setdefault((name, way), []).append(
                    (statistics.median(times) * 1e6, owner / args.n, front / args.n)
                )
    finally:
        for stack in stacks.values():
            stack.stop()
    med = statistics.median
    print("load average %.2f at start, %.2f at the end" % (loads[0], os.getloadavg()[0]))
    print("medians over %d rounds of %d requests each way" % (args.rounds, args.n))
    print(
        "%-8s %-10s %8s %15s %15s" % ("loop", "way", "p50 (us)", "owner CPU/req", "front CPU/req")
    )
    for (name, way), rows in figures.items():
        print(
            "%-8s %-10s %8.0f %15.0f %15.0f"
            % (name, way, med(r[0] for r in rows), med(r[1] for r in rows), med(r[2] for r in rows))
        )
    for name in stacks:
        ratios = [
            f[0] / d[0] for f, d in zip(figures[(name, "forwarded")], figures[(name, "direct")])
        ]
        print(
            "%s: forwarded / direct p50, median of the rounds' ratios: %.2fx" % (name, med(ratios))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
