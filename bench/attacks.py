"""What an attacker on the bridge's doorstep costs a well-behaved guest (issue "Hold the line").

    sudo .venv/bin/python bench/attacks.py [--tree DIR] [--attacks 1,2,4,6] [--seconds 6]
                                           [--nofile 1024:1024] [--json OUT]

Runs the bridge of the checkout at DIR (its own DIR/.venv/bin/python, `-m hostbridge.daemon`; by
default this checkout) with one simulated good guest (bench/guest_sim.py) and measures, without
and then under each attack, the good guest's query through the unix API socket and through TLS
with a token (p50, p99, max, share answered within 2 s), the bridge's CPU (cores) and resident
memory, and how many bytes it wrote to stderr. Run it on an old checkout and on this one to get a
before/after table.

1. half-open TLS: 1,100 connections from 127.0.0.2-9 that complete the handshake, send half a
   request and hold (no credentials);
2. wrong passwords: 16 keep-alive clients from 127.0.0.2 sending requests with a wrong Basic
   password as fast as they are answered (the good client is 127.0.0.1);
4. a guest channel whose socket accepts each connection and closes it at once (the bridge's
   connects to it are counted);
6. local users: 4 users of the agent's socket group (uids 65534-65531, group nogroup) each holding
   16 connections to the guest agent's local socket with half a request, reopening any the agent
   closes. Here the target is the checkout's guest agent (`-m guestagent.daemon`, no host on its
   channel), and the good client is root: one get on a new connection, and the `ovmd -g` command.

Loopback only; every phase stops by itself; every process and file is cleaned up. The bridge's
RLIMIT_NOFILE is --nofile (default 1,024:1,024: the soft limit a unit without LimitNOFILE gets).
One baseline and one attack phase per attack, not interleaved rounds: the effects measured here
are 10x and more, far above this machine's noise, which small differences are not.
"""

from __future__ import annotations

import argparse
import base64
import grp
import json
import os
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "bench-attacks-token-0123456789abcdef"
AGENT_VALUE = "root can read this"
# Attack 6: local users of the socket's group, each holding connections with half a request.
LOCAL_USERS = (65534, 65533, 65532, 65531)  # nobody, and uids without a name: the kernel needs none
PER_USER = 16  # 64 in all: the old agent's one global limit
HALF_A_REQUEST = b'{"t":"get","id":1,"key":"some.ke'
QUERY = "GET /v1/vms/vm0000/keys/bench.k0 HTTP/1.1\r\nHost: x\r\n%s\r\n"


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def http_once(sock, request):
    """Send one request on ``sock`` and read one whole response (Content-Length framing)."""
    sock.sendall(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return int(head.split()[1])


class Watched:
    """A daemon started by the benchmark (``proc``, its stderr in ``stderr_path``): its costs."""

    proc: subprocess.Popen
    stderr_path: str

    def cpu(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stderr_bytes(self):
        return os.path.getsize(self.stderr_path)

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


class Bridge(Watched):
    def __init__(self, tree, work, nofile, extra_vms):
        self.work = work
        self.port = free_port()
        self.api = os.path.join(work, "api.sock")
        self.stderr_path = os.path.join(work, "bridge.err")
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out",
             cert],
            check=True, capture_output=True,
        )  # fmt: skip
        self.cert = cert
        tokens = os.path.join(work, "tokens")
        with open(tokens, "w") as f:
            f.write("bench:%s\n" % TOKEN)
        os.chmod(tokens, 0o600)
        users = os.path.join(work, "users")
        py = os.path.join(tree, ".venv", "bin", "python")
        code = (
            "import sys; from hostbridge.auth import add_user; add_user(sys.argv[1], 'admin', 'pw')"
        )
        subprocess.run([py, "-c", code, users], check=True, cwd=tree)
        cmd = [py, "-m", "hostbridge.daemon", "--no-discover", "--db", os.path.join(work, "db"),
               "--api-socket", self.api, "--api-tcp", "127.0.0.1:%d" % self.port, "--tls-cert",
               cert, "--tls-key", key, "--tokens-file", tokens, "--users-file", users,
               "--vm", "vm0000=unix:" + os.path.join(work, "g0000.sock")]  # fmt: skip
        for name, path in extra_vms.items():
            cmd += ["--vm", "%s=unix:%s" % (name, path)]
        soft, hard = nofile

        def limits():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=self.stderr, preexec_fn=limits
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.query_unix() is not None:
                return
            time.sleep(0.2)
        raise SystemExit("the bridge did not answer a query within 30 s")

    def probes(self):
        """The good client's two ways in; each returns whether it got its answer."""
        return (
            ("unix", lambda: self.query_unix() == 200),
            ("tls", lambda: self.query_tls() == 200),
        )

    def query_unix(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.api)
                return http_once(s, QUERY % "Connection: close\r\n")
        except (OSError, ValueError):
            return None

    def query_tls(self):
        ctx = ssl.create_default_context(cafile=self.cert)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    auth = "Authorization: Bearer %s\r\nConnection: close\r\n" % TOKEN
                    return http_once(s, QUERY % auth)
        except (OSError, ValueError):
            return None


class Agent(Watched):
    """The guest agent of the checkout at ``tree`` (``-m guestagent.daemon``), its local socket open
    to the members of nogroup, one key in its cache; no host on its channel (the local socket does
    not need one)."""

    def __init__(self, tree, work):
        os.chmod(work, 0o755)  # others reach the socket in it
        self.socket = os.path.join(work, "ovmd.sock")
        self.stderr_path = os.path.join(work, "ovmd.err")
        conf = os.path.join(work, "ovmd.conf")
        with open(conf, "w") as f:
            f.write("[ovmd]\ngroup = nogroup\n")
        self.ovmd = os.path.join(tree, ".venv", "bin", "ovmd")
        cmd = [os.path.join(tree, ".venv", "bin", "python"), "-m", "guestagent.daemon",
               "--channel", os.path.join(work, "no-channel"), "--socket", self.socket,
               "--state-dir", os.path.join(work, "state"), "--config", conf, "-d", "1"]  # fmt: skip
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 30
        while not self.get_socket():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the agent did not answer within 30 s")
            self.cli("-p", "bench.k0=" + AGENT_VALUE)
            time.sleep(0.2)

    def probes(self):
        """Root's two ways in: one request on a new connection, and the `ovmd -g` command."""
        return (("socket", self.get_socket), ("ovmd -g", self.get_cli))

    def cli(self, *args):
        return subprocess.run(
            [self.ovmd, "--socket", self.socket, "--config", "/nonexistent", *args],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip

    def get_cli(self):
        try:
            done = self.cli("-g", "bench.k0")
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0 and done.stdout == AGENT_VALUE + "\n"

    def get_socket(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.socket)
                s.sendall(b'{"t":"get","id":1,"key":"bench.k0"}\n')
                line = b""
                while not line.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return False
                    line += chunk
                return b'"t":"ok"' in line
        except OSError:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(target, seconds):
    """Ask through each of ``target``'s probes in turn for ``seconds``; the answers, its costs."""
    probes = target.probes()
    lat: dict = {kind: [] for kind, _ in probes}
    ok = dict.fromkeys(lat, 0)
    tries = dict.fromkeys(lat, 0)
    cpu0, err0 = target.cpu(), target.stderr_bytes()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for kind, fn in probes:
            t0 = time.perf_counter()
            answered = fn()
            tries[kind] += 1
            if answered:
                ok[kind] += 1
                lat[kind].append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
    out: dict = {
        "cpu_cores": (target.cpu() - cpu0) / seconds,
        "rss_mb": target.rss_mb(),
        "stderr_bytes": target.stderr_bytes() - err0,
        "kinds": list(lat),
    }
    for kind in lat:
        out[kind] = {
            "p50_ms": pct(lat[kind], 0.5),
            "p99_ms": pct(lat[kind], 0.99),
            "max_ms": max(lat[kind]) if lat[kind] else float("nan"),
            "answered": ok[kind] / max(1, tries[kind]),
            "tries": tries[kind],
        }
    return out


# ---- attackers (threads in this process; each stops when ``stop`` is set) ----


def half_open(bridge, stop, count=1100):
    ctx = ssl.create_default_context(cafile=bridge.cert)
    held = []
    i = 0
    while not stop.is_set() and len(held) < count and i < count * 3:
        source = "127.0.0.%d" % (2 + i % 8)
        i += 1
        try:
            raw = socket.create_connection(
                ("127.0.0.1", bridge.port), timeout=2, source_address=(source, 0)
            )
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nAuthoriz")
            held.append(s)
        except OSError:
            pass
    stop.wait()
    for s in held:
        s.close()


def wrong_passwords(bridge, stop, counter, source):
    ctx = ssl.create_default_context(cafile=bridge.cert)
    auth = "Authorization: Basic %s\r\n" % base64.b64encode(b"admin:wrong").decode()
    request = "GET /v1/vms HTTP/1.1\r\nHost: x\r\n%s\r\n" % auth
    while not stop.is_set():
        try:
            address = ("127.0.0.1", bridge.port)
            with socket.create_connection(address, timeout=5, source_address=(source, 0)) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    while not stop.is_set():
                        status = http_once(s, request)
                        counter[status] = counter.get(status, 0) + 1
        except (OSError, ValueError):
            time.sleep(0.01)


def accept_and_close(path, stop, counter):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(64)
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        counter["accepts"] = counter.get("accepts", 0) + 1
        conn.close()
    srv.close()


def hold_half_requests(path, uid, gid, until, report):
    """In a forked child that has become ``uid``: keep PER_USER connections to ``path``, each having
    sent half a request, reopening each one the agent closes (20 ms apart), until ``until``; then
    write the counts to the pipe ``report`` and exit."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    held: list = []
    counts = {"connects": 0, "closed by the agent": 0}
    while time.monotonic() < until:
        while len(held) < PER_USER:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            try:
                s.connect(path)
                s.sendall(HALF_A_REQUEST)
            except OSError:
                s.close()
                break
            counts["connects"] += 1
            held.append(s)
        ready = select.select(held, [], [], 0.05)[0] if held else []
        for s in ready:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:  # (a refusal is a line, then the end)
                held.remove(s)
                s.close()
                counts["closed by the agent"] += 1
        time.sleep(0.02)
    os.write(report, json.dumps(counts).encode())


def local_users(path, until):
    """One child per local user running hold_half_requests; returns a function that waits for
    them and sums their counts."""
    gid = grp.getgrnam("nogroup").gr_gid
    children = []
    for uid in LOCAL_USERS:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                os.close(r)
                hold_half_requests(path, uid, gid, until, w)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))

    def collect():
        total: dict = {}
        for pid, r in children:
            data = b""
            while chunk := os.read(r, 4096):
                data += chunk
            os.close(r)
            os.waitpid(pid, 0)
            for k, v in (json.loads(data) if data else {}).items():
                total[k] = total.get(k, 0) + v
        return total

    return collect


def run_local_attack(tree, seconds):
    """Attack 6, on the guest agent's local socket."""
    work = tempfile.mkdtemp(prefix="ovmd-attacks-")
    agent = None
    try:
        agent = Agent(tree, work)
        baseline = measure(agent, seconds)
        t0 = time.monotonic()
        collect = local_users(agent.socket, t0 + 1 + seconds + 0.5)
        time.sleep(1)  # let the attack build up
        attacked = measure(agent, seconds)
        counts = collect()
        elapsed = time.monotonic() - t0
        attacked["attack"] = {k: v / elapsed for k, v in counts.items()}
        return {"baseline": baseline, "attacked": attacked}
    finally:
        if agent is not None:
            agent.close()
        shutil.rmtree(work, ignore_errors=True)


def run_attack(number, tree, nofile, seconds):
    if number == 6:
        return run_local_attack(tree, seconds)
    work = tempfile.mkdtemp(prefix="ovmd-attacks-")
    sim = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "guest_sim.py"), "--dir", work, "--count", "1",
         "--extra", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    bridge = None
    try:
        sim.stdout.readline()
        bad = os.path.join(work, "bad.sock")
        bridge = Bridge(tree, work, nofile, {"bad": bad} if number == 4 else {})
        baseline = measure(bridge, seconds)
        stop = threading.Event()
        counter: dict = {}
        if number == 1:
            threads = [threading.Thread(target=half_open, args=(bridge, stop))]
        elif number == 2:
            threads = [
                threading.Thread(target=wrong_passwords, args=(bridge, stop, counter, "127.0.0.2"))
                for _ in range(16)
            ]
        else:
            threads = [threading.Thread(target=accept_and_close, args=(bad, stop, counter))]
        for t in threads:
            t.start()
        time.sleep(3 if number == 1 else 1)  # let the attack build up
        t0 = time.monotonic()
        attacked = measure(bridge, seconds)
        attacked["attack"] = {str(k): v / (time.monotonic() - t0) for k, v in counter.items()}
        stop.set()
        for t in threads:
            t.join(30)
        return {"baseline": baseline, "attacked": attacked}
    finally:
        if bridge is not None:
            bridge.close()
        sim.terminate()
        sim.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def show(number, result):
    names = {
        1: "half-open TLS",
        2: "wrong passwords x16",
        4: "accept-and-close guest",
        6: "64 half-requests on the agent's socket from 4 local users",
    }
    print("attack %d: %s" % (number, names[number]))
    header = (
        "phase",
        "via",
        "p50 ms",
        "p99 ms",
        "max ms",
        "answered",
        "cores",
        "RSS MB",
        "stderr B",
    )
    print("  %-9s %-7s %9s %9s %9s %9s %6s %8s %10s" % header)
    for phase in ("baseline", "attacked"):
        r = result[phase]
        for via in r["kinds"]:
            q = r[via]
            print("  %-9s %-7s %9.2f %9.2f %9.2f %8.0f%% %6.2f %8.1f %10d" % (
                phase, via, q["p50_ms"], q["p99_ms"], q["max_ms"], q["answered"] * 100,
                r["cpu_cores"], r["rss_mb"], r["stderr_bytes"]))  # fmt: skip
    if result["attacked"].get("attack"):
        rates = ", ".join(
            "%s %.0f/s" % (k, v) for k, v in sorted(result["attacked"]["attack"].items())
        )
        print("  attacker saw: " + rates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=ROOT, help="checkout whose bridge runs (with its .venv)")
    ap.add_argument("--attacks", default="1,2,4,6")
    ap.add_argument("--seconds", type=float, default=6.0, help="each phase (default 6)")
    ap.add_argument("--nofile", default="1024:1024", help="the bridge's RLIMIT_NOFILE SOFT:HARD")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    soft, _, hard = args.nofile.partition(":")
    nofile = (int(soft), int(hard or soft))
    # The attackers here hold over a thousand sockets.
    _, my_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (my_hard, my_hard))
    tree = os.path.abspath(args.tree)
    rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(
        "tree %s (%s), bridge RLIMIT_NOFILE %d:%d, %.0f s phases"
        % (tree, rev, *nofile, args.seconds)
    )
    results = {}
    for number in [int(n) for n in args.attacks.split(",")]:
        results[number] = run_attack(number, tree, nofile, args.seconds)
        show(number, results[number])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tree": tree, "rev": rev, "nofile": nofile, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
