"""Pool benchmark: three pool bridges on one PostgreSQL database beside one SQLite bridge.

Run by hand, never in CI (see bench/README.md):

    .venv/bin/python bench/pool.py [--quick] [--rounds N] [--json OUT.json] [--keep]

Everything real but libvirt and the guests, on this machine (docs/pool.md):

- the suite's own PostgreSQL cluster (tests/support/postgres.py: private directory, unix socket,
  fsync on), one database for the pool;
- three pool bridges, hv1, hv2 and hv3: each the real daemon with libvirt's lifecycle events
  played through a socket (tests/support/sim_bridge.py, tests/support/simlifecycle.py), its own
  libvirt channel directory (discovery on), API unix socket, TLS API on 127.0.0.1, [pool] host,
  url, key_file, ca_file and [store] url;
- one bridge alone on SQLite (no [store]), the yardstick, configured the same way otherwise
  (discovery, played lifecycle events, API unix socket);
- four bench/guest_sim.py processes of 1,000 guests each, one per bridge, each guest's socket
  where libvirt binds a channel (<dir>/domain-<k>-<name>/com.oracle.ovmd), so that discovery finds
  and names the VMs: 3,000 VMs in the pool, 1,000 on the yardstick.

Load phases (a load generator in its own process: keep-alive HTTP/1.1 over each bridge's API unix
socket, bench/bridge.py's connections), each a window after a warm-up:

  sends through the owners: 16 connections to each pool bridge, each sending to a VM of that
    bridge drawn at random (the pool's aggregate), beside the same on the SQLite bridge
  sends through a non-owner: 16 connections to each pool bridge, to the VMs of the next one
    (each send forwarded over TLS to its owner)
  queries through the owners / through a non-owner / on the SQLite bridge: the same, with
    GET /v1/vms/{vm}/keys/{key} (every answer checked: the value, stale false)
  sequential (one connection): the same queries to hv1's VMs through hv1 (the owner) and through
    hv2 (a non-owner, forwarding), with the same seed, so the same queries; the SQLite bridge's;
    sends through the owner and through a non-owner

Rounds interleave the phases, their order reversed every other round; the summary gives the
medians over the rounds and the median of each round's ratio.

Then a migration: 100 VMs move, one after the other, to the next host, in libvirt's order (source
SUSPENDED_MIGRATED, destination STARTED_MIGRATED with the socket now in its directory, destination
RESUMED_MIGRATED, source STOPPED_MIGRATED), while a paced stream of sends to those 100 VMs goes
through all three bridges. Handoff: from the destination's RESUMED_MIGRATED (sent by this
controller) to the first bytes the guest gets from the destination bridge, and to its first set.
Lost: sends answered delivered or queued that the guest never applied (after draining);
duplicates: a message applied twice; re-deliveries that the guest's seq check dropped are counted
apart.
"""

import argparse
import asyncio
import base64
import functools
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import orjson
from bridge import _Conn, fmt, http_get, kill_pid, med, print_table
from guest_agent import (
    VENV_PY,
    BenchError,
    percentile,
    proc_cpu_ticks,
    proc_rss_kib,
    real_interpreter,
    venv_python_argv,
)
from guest_sim import CHANNEL_NAME, guest_name, key_name, value_for

CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_SIM = os.path.join(HERE, "guest_sim.py")
HOSTS = ("hv1", "hv2", "hv3")
KEYS = 4  # keys pre-set in each guest (bench.k0..3: what queries ask)
SEND_KEYS = 4  # a send sets bench.s0..3: the mirrors stay small
MIG_PREFIX = "mig."  # the migration stream's keys; guest_sim records their applied values
CONCURRENCY = 16  # connections per bridge in the loaded phases

GOAL_SEND_RATIO = 2.0  # the pool's sends/s over one SQLite bridge's
GOAL_FORWARD_RATIO = 2.0  # a query through a non-owner over one through the owner (p50)
GOAL_HANDOFF_P99_S = 1.0

# name -> (kind, side, via, connections per bridge); side "pool", "one" (hv1 alone, the others
# idle: what one host of a pool does) or "single"; via "owner" (each bridge its own VMs) or
# "other" (each bridge the next one's VMs). Sequential phases ("seq_") go to hv1's VMs only.
PHASES = {
    "send_pool": ("send", "pool", "owner", CONCURRENCY),
    "send_one": ("send", "one", "owner", CONCURRENCY),
    "send_single": ("send", "single", "owner", CONCURRENCY),
    "send_pool_other": ("send", "pool", "other", CONCURRENCY),
    "query_pool": ("query", "pool", "owner", CONCURRENCY),
    "query_single": ("query", "single", "owner", CONCURRENCY),
    "query_pool_other": ("query", "pool", "other", CONCURRENCY),
    "seq_query_owner": ("query", "pool", "owner", 1),
    "seq_query_other": ("query", "pool", "other", 1),
    "seq_query_single": ("query", "single", "owner", 1),
    "seq_send_owner": ("send", "pool", "owner", 1),
    "seq_send_other": ("send", "pool", "other", 1),
}
# Interleaved within a round, in this order on even rounds and reversed on odd ones.
GROUPS = (
    ("send_pool", "send_single", "send_pool_other", "send_one"),
    ("query_pool", "query_single", "query_pool_other"),
    ("seq_query_owner", "seq_query_other", "seq_query_single"),
    ("seq_send_owner", "seq_send_other"),
)


# ------------------------------------------------------------------------- the load generator --
# `pool.py --loadgen ...`: its own process, so that its CPU is not the bridges'. Each connection
# goes to one bridge's API socket and picks its VMs from one range of guest numbers.


class _PoolConn(_Conn):
    def __init__(self, gen, names):
        super().__init__(gen)
        self.names = names
        self.value = None  # the migration stream's: (vm, value) of the send in flight
        self.slot = 0.0

    def send_next(self):
        gen = self.gen
        if gen.stopping or self.lost:
            self.busy = False
            gen.idle_one()
            return
        if gen.interval:
            # Paced (the migration stream): this connection's next slot, without catching up
            # after a slow answer (a burst would not be a steady stream).
            loop = asyncio.get_running_loop()
            now = loop.time()
            self.slot = max(now, self.slot + gen.interval)
            if self.slot > now + 0.001:
                self.busy = True
                loop.call_at(self.slot, self._send_now)
                return
        self._send_now()

    def _send_now(self):
        gen = self.gen
        if gen.stopping or self.lost:
            self.busy = False
            gen.idle_one()
            return
        self.busy = True
        if gen.kind == "query":
            vm = self.names[gen.rnd.randrange(len(self.names))]
            j = gen.rnd.randrange(gen.keys)
            self.expect = value_for(vm, j)
            req = b"GET /v1/vms/%s/keys/%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (
                vm.encode("ascii"),
                key_name(j).encode("ascii"),
            )
        else:
            gen.count += 1
            if gen.kind == "mig":
                # Round robin over the migrating VMs, each value of its own (lost and
                # duplicated messages are told by value).
                vm = self.names[gen.count % len(self.names)]
                value = "%s-%d" % (vm, gen.count)
                self.value = (vm, value)
                body = b'{"key":"%s","value":"%s","timeout":%g}' % (
                    (MIG_PREFIX + "k%d" % (gen.count % SEND_KEYS)).encode("ascii"),
                    value.encode("ascii"),
                    gen.send_timeout,
                )
            else:
                vm = self.names[gen.rnd.randrange(len(self.names))]
                body = b'{"key":"bench.s%d","value":"v%d"}' % (gen.count % SEND_KEYS, gen.count)
            req = (
                b"POST /v1/vms/%s/messages HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (vm.encode("ascii"), len(body), body)
            )
        transport = self.transport
        assert transport is not None  # connection_made() came first
        self.t0 = time.perf_counter()
        transport.write(req)


class _Gen:
    """What every connection shares: the random source, the counters, the window."""

    def __init__(self, kind, keys, seed, interval=0.0, send_timeout=5.0):
        self.kind = kind
        self.keys = keys
        self.rnd = random.Random(seed)
        self.interval = interval
        self.send_timeout = send_timeout
        self.count = 0
        self.stopping = False
        self.win_start = None
        self.win_end = None
        self.lat = []
        self.done_total = 0
        self.done_in_window = 0
        self.stale = 0
        self.wrong = 0
        self.outcomes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        # The migration stream: vm -> outcome ("delivered", "queued", "error NNN") -> values.
        self.answers: dict[str, dict[str, list[str]]] = {}
        self._busy = 0
        self.all_idle = None

    def idle_one(self):
        self._busy -= 1
        if self._busy <= 0 and self.all_idle is not None and not self.all_idle.done():
            self.all_idle.set_result(None)

    def record(self, conn, status, body, t1):
        self.done_total += 1
        outcome = None
        if status not in (200, 202):
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
            outcome = "error %d" % status
        elif self.kind == "query":
            doc = orjson.loads(body)
            if doc.get("value") != conn.expect:
                self.wrong += 1
            if doc.get("stale") is not False:
                self.stale += 1
        else:
            outcome = str(orjson.loads(body).get("outcome"))
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.kind == "mig" and conn.value is not None:
            vm, value = conn.value
            self.answers.setdefault(vm, {}).setdefault(outcome or "?", []).append(value)
        ws = self.win_start
        if ws is not None and conn.t0 >= ws and (self.win_end is None or t1 <= self.win_end):
            self.done_in_window += 1
            self.lat.append(t1 - conn.t0)


async def _open(gen, targets, concurrency):
    """``concurrency`` connections to each target (socket, names); all busy from now on."""
    loop = asyncio.get_running_loop()
    gen.all_idle = loop.create_future()
    conns = []
    for sock, names in targets:
        for _ in range(concurrency):
            _, c = await loop.create_unix_connection(functools.partial(_PoolConn, gen, names), sock)
            conns.append(c)
    gen._busy = len(conns)
    for c in conns:
        c.send_next()
    return conns


async def _finish(gen, conns):
    gen.stopping = True
    try:
        await asyncio.wait_for(gen.all_idle, 30.0)
    except asyncio.TimeoutError:
        gen.errors["unfinished_at_end"] = gen._busy
    for c in conns:
        if c.transport is not None:
            c.transport.close()


async def _window_main(args, targets):
    """A load phase: warm-up, then a window (its edges printed for the parent's CPU samples)."""
    gen = _Gen(args.kind, args.keys, args.seed)
    conns = await _open(gen, targets, args.concurrency)
    await asyncio.sleep(args.warmup)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    gen.win_start = time.perf_counter()
    print("window-start", flush=True)
    await asyncio.sleep(args.duration)
    gen.win_end = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    print("window-end", flush=True)
    await _finish(gen, conns)
    lat = sorted(gen.lat)
    window = gen.win_end - gen.win_start
    res = {
        "connections": len(conns),
        "window_s": window,
        "completed": gen.done_in_window,
        "rate": gen.done_in_window / window,
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "total_requests": gen.done_total,
        "errors": gen.errors,
        "outcomes": gen.outcomes,
        "stale": gen.stale,
        "wrong_value": gen.wrong,
        "loadgen_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }
    print(json.dumps(res), flush=True)


async def _stream_main(args, targets):
    """The migration's send stream: paced, until stdin ends; then every answer, by VM."""
    gen = _Gen("mig", args.keys, args.seed, args.interval, args.send_timeout)
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()

    def readable():
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            eof.set()

    loop.add_reader(sys.stdin.fileno(), readable)
    conns = await _open(gen, targets, args.concurrency)
    gen.win_start = time.perf_counter()
    print("started", flush=True)
    await eof.wait()
    gen.win_end = time.perf_counter()
    await _finish(gen, conns)
    lat = sorted(gen.lat)
    res = {
        "connections": len(conns),
        "window_s": gen.win_end - gen.win_start,
        "sent": gen.done_total,
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "outcomes": gen.outcomes,
        "errors": gen.errors,
        "answers": gen.answers,
    }
    print(json.dumps(res), flush=True)


def loadgen_main(argv):
    ap = argparse.ArgumentParser(prog="pool.py --loadgen")
    ap.add_argument("--kind", choices=("send", "query", "mig"), required=True)
    ap.add_argument(
        "--target",
        nargs=3,
        action="append",
        required=True,
        metavar=("SOCKET", "FIRST", "COUNT"),
        help="connections to SOCKET for guests FIRST .. FIRST+COUNT-1 (repeatable)",
    )
    ap.add_argument("--names", help="instead of the ranges: these VMs (comma-separated)")
    ap.add_argument("--concurrency", type=int, required=True, help="connections per target")
    ap.add_argument("--keys", type=int, default=KEYS)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.0, help="mig: seconds between sends")
    ap.add_argument("--send-timeout", type=float, default=5.0, help="mig: a send's timeout")
    args = ap.parse_args(argv)
    targets = []
    for sock, first, count in args.target:
        if args.names:
            names = args.names.split(",")
        else:
            names = [guest_name(int(first) + i) for i in range(int(count))]
        targets.append((sock, names))
    if args.kind == "mig":
        asyncio.run(_stream_main(args, targets))
    else:
        asyncio.run(_window_main(args, targets))
    return 0


# --------------------------------------------------------------------------------- the parts --


def pipes(proc: subprocess.Popen) -> tuple[IO[bytes], IO[bytes]]:
    """A child's stdout and stderr (opened with PIPE: never None)."""
    assert proc.stdout is not None and proc.stderr is not None
    return proc.stdout, proc.stderr


def write_private(path, text):
    """A file only its owner may read (the bridges refuse a readable pool key or tokens file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_tls_cert(directory):
    """A self-signed certificate for 127.0.0.1 (the openssl CLI): every bridge's, and the CA the
    bridges verify each other with."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key]
    command += ["-out", cert, "-days", "2", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


def store_url(conninfo):
    """PostgresCluster's key=value conninfo as the postgresql:// URL [store] url takes (the host
    is the cluster's socket directory)."""
    parts = dict(p.split("=", 1) for p in conninfo.split())
    query = urllib.parse.urlencode(
        {"host": parts["host"], "port": parts["port"], "user": parts["user"]}
    )
    return "postgresql:///%s?%s" % (urllib.parse.quote(parts["dbname"]), query)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bridge_env():
    """The bridges' environment. PATH is the venv's bin alone: discovery asks `virsh domname` for
    each new VM's full name when virsh is on PATH, and here (no libvirtd: URI "sim") every such
    call would fail after ~20 ms, 1,000 times per bridge at start; the directory's name is the
    full name anyway (under 20 characters). PG* variables would redirect libpq."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PATH"] = os.path.dirname(VENV_PY)
    return env


class Sim:
    """One bench/guest_sim.py: ``count`` guests from number ``first``, in libvirt's layout under
    ``channels``, with a control socket for migrations."""

    def __init__(self, directory, real_py, first, count):
        self.dir = directory
        self.channels = os.path.join(directory, "channels")
        os.mkdir(self.channels)
        self.first = first
        self.count = count
        self.control = os.path.join(directory, "sim.ctl")
        self.log_path = os.path.join(directory, "guest_sim.log")
        argv, exe = venv_python_argv(
            real_py,
            [GUEST_SIM, "--dir", self.channels, "--count", str(count), "--keys", str(KEYS)]
            + ["--first", str(first), "--layout", "libvirt", "--control", self.control]
            + ["--record", MIG_PREFIX],
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, executable=exe, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout
        line = self.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            raise BenchError("guest_sim did not start (%r); see %s" % (line, self.log_path))

    def names(self):
        return [guest_name(self.first + i) for i in range(self.count)]

    def command(self, line, timeout=30.0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control)
            s.sendall(line.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        text = answer.decode().strip()
        if text != "ok":
            raise BenchError("guest_sim: %s: %s" % (line.split()[0], text or "no answer"))

    def dump(self):
        path = os.path.join(self.dir, "dump.json")
        self.command("dump %s" % path)
        with open(path) as f:
            return json.load(f)

    def stop(self):
        kill_pid(self.pid)
        self._log.close()
        self.stdout.close()


class HostBridge:
    """One bridge process (tests/support/sim_bridge.py: the daemon, lifecycle events played on
    ``events``); a pool host when ``pool`` is given, else alone on SQLite."""

    def __init__(self, directory, name, sim, pool, debug):
        self.dir = directory
        self.name = name
        self.sim = sim
        self.api_socket = os.path.join(directory, "api.sock")
        self.events = os.path.join(directory, "events.sock")
        self.config_path = os.path.join(directory, "bridge.toml")
        self.log_path = os.path.join(directory, "bridge.log")
        self.debug = debug
        self.port = None
        self.proc = None
        self.pid = None
        self.t_start = None
        lines = [
            "[bridge]",
            "db = %s" % json.dumps(os.path.join(directory, "bridge.sqlite3")),
            "discover = true",
            "libvirt_dirs = %s" % json.dumps([sim.channels]),
            "discover_interval = 1.0",
            'libvirt_uri = "sim"',
            "api_socket = %s" % json.dumps(self.api_socket),
        ]
        if pool is not None:
            self.port = free_port()
            url = "https://127.0.0.1:%d" % self.port
            lines += [
                'api_tcp = "127.0.0.1:%d"' % self.port,
                "tls_cert = %s" % json.dumps(pool["cert"]),
                "tls_key = %s" % json.dumps(pool["tls_key"]),
                "tokens_file = %s" % json.dumps(pool["tokens_file"]),
                "",
                "[store]",
                "url = %s" % json.dumps(pool["store_url"]),
                "",
                "[pool]",
                "host = %s" % json.dumps(name),
                "url = %s" % json.dumps(url),
                "key_file = %s" % json.dumps(pool["key_file"]),
                "ca_file = %s" % json.dumps(pool["cert"]),
            ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def record_running(self):
        """libvirtd's view before the bridge starts: every guest of its simulator runs here
        (listed at the bridge's start; a pool bridge leaves a channel alone until libvirt has
        said that its VM runs)."""
        from tests.support.simlifecycle import record_state

        for name in self.sim.names():
            record_state(self.events, name, "running", "STARTED_BOOTED")

    def start(self, real_py, profile=None):
        """Start the bridge; under cProfile (written to PROFILE.<name> at its stop) when
        ``profile`` is given."""
        args = ["-m", "tests.support.sim_bridge", "--events", self.events]
        args += ["--config", self.config_path, "-d", str(self.debug)]
        if profile:
            args = ["-m", "cProfile", "-o", "%s.%s" % (profile, self.name)] + args
        argv, exe = venv_python_argv(real_py, args)
        self._log = open(self.log_path, "ab")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            executable=exe,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,  # -m finds tests.support here
            env=bridge_env(),
        )
        self.pid = self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n=12):
        return "\n".join("    " + line for line in self.log_text().splitlines()[-n:])

    def get(self, target, timeout=10.0):
        status, body = http_get(self.api_socket, target, timeout)
        if status != 200:
            raise BenchError(
                "%s: GET %s answered %d: %s"
                % (self.name, target.split("?")[0], status, body[:200].decode("utf-8", "replace"))
            )
        return orjson.loads(body)

    def health(self):
        try:
            return self.get("/v1/health", 5.0)
        except (OSError, BenchError):
            return None

    def check_alive(self):
        if not self.alive():
            raise BenchError(
                "bridge %s exited with status %s:\n%s"
                % (self.name, self.proc and self.proc.poll(), self.log_tail())
            )

    def stop(self):
        status = kill_pid(self.pid, grace=30.0) if self.pid is not None else None
        if self.proc is not None:
            self._log.close()
        self.pid = None
        return status


def wait_synced(bridges, n, timeout):
    """Seconds from each bridge's start until its n guests are synced (GET /v1/health)."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    last = {}
    while len(done) < len(bridges):
        for b in bridges:
            if b.name in done:
                continue
            b.check_alive()
            h = b.health()
            if h is not None:
                last[b.name] = h.get("connected", 0)
                if last[b.name] >= n:
                    done[b.name] = time.monotonic() - b.t_start
        if time.monotonic() > deadline:
            slow = [b for b in bridges if b.name not in done]
            raise BenchError(
                "not synced within %.0f s: %s\n%s"
                % (
                    timeout,
                    ", ".join("%s %d of %d" % (b.name, last.get(b.name, 0), n) for b in slow),
                    slow[0].log_tail(),
                )
            )
        time.sleep(0.2)
    return done


def wait_placements(pool, timeout):
    """Until every pool bridge lists every VM of the pool with its owner: the placements a
    bridge routes by (read at its start, then updated by notifications)."""
    want = {}
    for b in pool:
        for name in b.sim.names():
            want[name] = b.name
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while True:
        missing = {}
        for b in pool:
            b.check_alive()
            listed = {vm["name"]: vm.get("host") for vm in b.get("/v1/vms", 60.0)["vms"]}
            wrong = [vm for vm, host in want.items() if listed.get(vm) != host]
            if wrong:
                missing[b.name] = (len(wrong), wrong[0], listed.get(wrong[0], "absent"))
        if not missing:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise BenchError(
                "placements not known everywhere within %.0f s: %s"
                % (
                    timeout,
                    "; ".join(
                        "%s: %d VMs wrong (e.g. %s: %s)" % (h, n, vm, owner)
                        for h, (n, vm, owner) in missing.items()
                    ),
                )
            )
        time.sleep(1.0)


# --------------------------------------------------------------------------------- the phases --


def tolerant_ticks(pids):
    """utime + stime summed over ``pids``, skipping processes that are gone."""
    total = 0
    for pid in pids:
        try:
            total += proc_cpu_ticks(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


class Run:
    """The parts of a run and how a phase reaches them."""

    def __init__(self, args, real_py, workdir):
        self.args = args
        self.real_py = real_py
        self.workdir = workdir
        self.cluster = None
        self.pool = []  # HostBridge, hv1..hv3
        self.single = None
        self.sims = []

    def pg_pids(self):
        return self.cluster.processes() if self.cluster is not None else []

    def cpu_groups(self):
        """name -> the pids whose CPU a phase reports together."""
        groups = {
            "pool bridges": [b.pid for b in self.pool if b.pid],
            "sqlite bridge": [self.single.pid] if self.single and self.single.pid else [],
            "guest_sims": [s.pid for s in self.sims],
            "postgres": self.pg_pids(),
        }
        return groups

    def targets(self, side, via, seq):
        """[(socket, first guest, count)] of a phase."""
        if side == "single":
            b = self.single
            assert b is not None
            return [(b.api_socket, b.sim.first, b.sim.count)]
        out = []
        bridges = self.pool[:1] if seq or side == "one" else self.pool
        for b in bridges:
            k = self.pool.index(b)
            to = self.pool[(k + 1) % len(self.pool)] if via == "other" else b
            out.append((to.api_socket, b.sim.first, b.sim.count))
        return out

    def phase(self, name, seed):
        kind, side, via, conc = PHASES[name]
        seq = conc == 1
        a = self.args
        warmup = a.warmup
        duration = a.seq_window if seq else a.window
        argv = ["--loadgen", "--kind", kind, "--concurrency", str(conc), "--keys", str(KEYS)]
        argv += ["--warmup", str(warmup), "--duration", str(duration), "--seed", str(seed)]
        for sock, first, count in self.targets(side, via, seq):
            argv += ["--target", sock, str(first), str(count)]
        # The send path's commits (GET /v1/health), summed over the side's bridges, read just
        # before and after the load generator's run: its warm-up and drain are counted too, as
        # are its requests (total_requests).
        if side == "single":
            bridges = [b for b in [self.single] if b is not None]
        else:
            bridges = self.pool if side == "pool" else self.pool[:1]
        h0 = [b.health() or {} for b in bridges]
        res, wall, cpu = run_loadgen(self.real_py, argv, self.cpu_groups())
        h1 = [b.health() or {} for b in bridges]
        for k in ("commits", "commit_units"):
            res[k] = sum(b.get(k, 0) - a.get(k, 0) for a, b in zip(h0, h1))
        res["requests_per_commit"] = (
            res["total_requests"] / res["commits"] if kind == "send" and res["commits"] else None
        )
        res["cpu_pct"] = {k: v * 100.0 / wall for k, v in cpu.items()}
        res["cpu_pct"]["loadgen"] = res["loadgen_cpu_s"] * 100.0 / res["window_s"]
        for b in self.pool + ([self.single] if self.single else []):
            b.check_alive()
        return res


def run_loadgen(real_py, loadgen_args, groups):
    """``pool.py LOADGEN_ARGS`` in its own process; its result, the window's wall seconds and
    each group's CPU seconds in the window (processes that come and go, as PostgreSQL's
    autovacuum workers, are counted while they live)."""
    argv, exe = venv_python_argv(real_py, [os.path.abspath(__file__), *loadgen_args])
    proc = subprocess.Popen(
        argv,
        executable=exe,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = pipes(proc)
    try:

        def expect(word):
            line = stdout.readline().decode().strip()
            if line != word:
                err = stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise BenchError(
                    "load generator: expected %r, got %r; %s"
                    % (word, line, err[-1:] or "no error output")
                )

        expect("window-start")
        t0 = time.monotonic()
        before = {k: {pid: tolerant_ticks([pid]) for pid in pids} for k, pids in groups.items()}
        expect("window-end")
        t1 = time.monotonic()
        cpu = {}
        for k, pids in groups.items():
            # A process born in the window counts from zero: close enough for one that lives
            # less than a window (PostgreSQL's workers).
            now = {pid: tolerant_ticks([pid]) for pid in set(pids) | set(before[k])}
            cpu[k] = sum(now[p] - before[k].get(p, 0) for p in now if now[p]) / float(CLK_TCK)
        out = stdout.readline()
        if not out:
            err = stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise BenchError("load generator gave no result: %s" % (err[-1:] or "?"))
        res = json.loads(out)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)
        stdout.close()
        stderr.close()
    return res, t1 - t0, cpu


def run_round(run, i):
    r: dict[str, Any] = {"phases": {}, "order": []}
    for g, group in enumerate(GROUPS):
        order = list(group) if (i + g) % 2 == 0 else list(reversed(group))
        for name in order:
            if name not in run.args.phases:
                continue
            if run.single is None and PHASES[name][1] == "single":
                continue
            if not run.pool and PHASES[name][1] in ("pool", "one"):
                continue
            r["order"].append(name)
            r["phases"][name] = run.phase(name, 1000 * i + 17 * g + 1)
    return r


def print_round(r, i):
    print("round %d:" % (i + 1))
    for name in r["order"]:
        x = r["phases"][name]
        cpu = x["cpu_pct"]
        extra = ""
        if x["outcomes"]:
            extra += " outcomes %s" % ",".join("%s %d" % kv for kv in sorted(x["outcomes"].items()))
        if x["stale"] or x["wrong_value"]:
            extra += " stale %d wrong %d" % (x["stale"], x["wrong_value"])
        if x["errors"]:
            extra += " errors %s" % x["errors"]
        if x.get("requests_per_commit"):
            extra += " sends/commit %.2f" % x["requests_per_commit"]
        print(
            "    %-17s %3d conn: %7.0f /s  p50 %7.2f ms  p99 %7.2f ms  max %7.1f ms  CPU%% %s%s"
            % (
                name,
                x["connections"],
                x["rate"],
                x["p50_ms"] or 0,
                x["p99_ms"] or 0,
                x["max_ms"] or 0,
                ", ".join("%s %.0f" % (k, v) for k, v in cpu.items() if v >= 0.5),
                extra,
            )
        )
    sys.stdout.flush()


# -------------------------------------------------------------------------------- migration --


class Stream:
    """The migration's send stream (``pool.py --loadgen --kind mig``) until stop()."""

    def __init__(self, run, names, rate, send_timeout):
        per_bridge = 4
        conns = per_bridge * len(run.pool)
        argv = ["--loadgen", "--kind", "mig", "--concurrency", str(per_bridge)]
        argv += ["--names", ",".join(names), "--interval", str(conns / rate)]
        argv += ["--send-timeout", str(send_timeout), "--seed", "7"]
        for b in run.pool:
            argv += ["--target", b.api_socket, "0", "0"]
        full, exe = venv_python_argv(run.real_py, [os.path.abspath(__file__), *argv])
        self.proc = subprocess.Popen(
            full,
            executable=exe,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout, self.stderr = pipes(self.proc)
        assert self.proc.stdin is not None
        self.stdin = self.proc.stdin
        line = self.stdout.readline().decode().strip()
        if line != "started":
            err = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
            kill_pid(self.proc.pid)
            raise BenchError("the send stream did not start: %s" % (err[-1:] or line))

    def stop(self):
        try:
            self.stdin.close()  # the stream stops at the end of its input
            out = self.stdout.readline()
            if not out:
                err = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise BenchError("the send stream gave no result: %s" % (err[-1:] or "?"))
            self.proc.wait(timeout=30)
            return json.loads(out)
        finally:
            if self.proc.poll() is None:
                kill_pid(self.proc.pid)
            self.stdout.close()
            self.stderr.close()


def migrate_one(vm, sim, src, dst, dom_id):
    """One live migration of ``vm`` (a guest of ``sim``) from ``src`` to ``dst`` in libvirt's
    order; the monotonic time at which the destination's RESUMED_MIGRATED was sent."""
    from tests.support.simlifecycle import send_event

    path = os.path.join(dst.sim.channels, "domain-%d-%s" % (dom_id, vm), CHANNEL_NAME)
    steps = []

    def event(b, event, detail, state):
        if not send_event(b.events, vm, event, detail, state):
            raise BenchError("bridge %s did not take %s of %s" % (b.name, detail, vm))
        steps.append(detail)

    event(src, "SUSPENDED", "SUSPENDED_MIGRATED", "migrating")
    sim.command("listen %s %s" % (vm, path))  # the destination's QEMU, paused, made the socket
    event(dst, "STARTED", "STARTED_MIGRATED", "migrating")
    sim.command("move %s" % vm)  # the switch-over: the guest runs behind the new socket
    t_resume = time.monotonic()
    event(dst, "RESUMED", "RESUMED_MIGRATED", "running")
    event(src, "STOPPED", "STOPPED_MIGRATED", "shutoff")
    return t_resume


def migration(run, res):
    """100 VMs (each host's first ones) to the next host, one after the other, under a stream of
    sends; then drain and compare what the guests applied with what the senders were told."""
    a = run.args
    plan = []  # (vm, source bridge, destination bridge): the guest lives in the source's sim
    n = len(run.pool)
    for k in range(a.migrate):
        src = run.pool[k % n]
        vm = guest_name(src.sim.first + k // n)
        plan.append((vm, src, run.pool[(k + 1) % n]))
    names = [vm for vm, _, _ in plan]
    print(
        "migration: %d VMs, each to the next host, one after the other, under a stream of %g "
        "sends/s (send timeout %g s) through all three bridges"
        % (len(plan), a.mig_rate, a.mig_send_timeout)
    )
    sys.stdout.flush()
    stream = Stream(run, names, a.mig_rate, a.mig_send_timeout)
    t_resumed = {}
    try:
        time.sleep(a.mig_lead)  # the stream runs before the first migration
        t0 = time.monotonic()
        for j, (vm, src, dst) in enumerate(plan):
            t_resumed[vm] = migrate_one(vm, src.sim, src, dst, 5000 + j)
            time.sleep(a.mig_gap)
        res["migrations_s"] = time.monotonic() - t0
        time.sleep(a.mig_lead)  # and after the last: sends through the new owners
    finally:
        answered = stream.stop()
    # Drain: every migrated VM's outbox empty at its new owner (or the deadline).
    t0 = time.monotonic()
    owners = {vm: dst for vm, _, dst in plan}
    left = dict.fromkeys(names, -1)
    while time.monotonic() - t0 < a.drain_timeout:
        for vm in [v for v, q in left.items() if q != 0]:
            try:
                info = owners[vm].get("/v1/vms/%s" % vm)
                left[vm] = info.get("queued", 0)
            except (OSError, BenchError):
                left[vm] = -1
        if not any(left.values()):
            break
        time.sleep(0.5)
    res["drain_s"] = time.monotonic() - t0
    res["undrained"] = {vm: q for vm, q in left.items() if q}
    # Who owns them now, as every bridge of the pool lists it.
    owner_wrong = {}
    for b in run.pool:
        listed = {vm["name"]: vm.get("host") for vm in b.get("/v1/vms", 60.0)["vms"]}
        wrong = [vm for vm in names if listed.get(vm) != owners[vm].name]
        if wrong:
            owner_wrong[b.name] = wrong[:5] + (["..."] if len(wrong) > 5 else [])
    res["owner_wrong"] = owner_wrong
    dumps = {}
    for s in run.sims:
        dumps.update(s.dump()["guests"])
    res["stream"] = {k: v for k, v in answered.items() if k != "answers"}
    res.update(judge_migration(plan, t_resumed, answered["answers"], dumps))


def judge_migration(plan, t_resumed, answers, dumps):
    """Handoff times, lost and duplicated messages from the stream's answers and the guests'
    records."""
    frame: list[float] = []
    first_set: list[float] = []
    early: list[float] = []
    lost, dup_values, applied_unanswered = [], [], 0
    redeliveries = epoch_changes = applied_total = answered_ok = 0
    never = []
    for vm, _, _ in plan:
        g = dumps.get(vm, {})
        t = t_resumed[vm]
        if g.get("first_frame") is None:
            never.append(vm)
        else:
            d = g["first_frame"] - t
            (early if d < 0 else frame).append(d)
        if g.get("first_set") is not None:
            first_set.append(g["first_set"] - t)
        redeliveries += g.get("dups", 0)
        epoch_changes += g.get("epoch_changes", 0)
        applied = g.get("applied") or {}
        applied_total += sum(applied.values())
        told = answers.get(vm, {})
        answered_ok += len(told.get("delivered", [])) + len(told.get("queued", []))
        for outcome in ("delivered", "queued"):
            for value in told.get(outcome, []):
                if value not in applied:
                    lost.append((vm, outcome, value))
        dup_values += [(vm, v, c) for v, c in applied.items() if c > 1]
        ok_values = set(told.get("delivered", [])) | set(told.get("queued", []))
        applied_unanswered += sum(1 for v in applied if v not in ok_values)
    frame.sort()
    first_set.sort()

    def pct(xs, p):
        return percentile(xs, p) if xs else None

    return {
        "handoff_s": {
            "n": len(frame),
            "p50": pct(frame, 50),
            "p99": pct(frame, 99),
            "max": frame[-1] if frame else None,
        },
        "handoff_first_set_s": {
            "n": len(first_set),
            "p50": pct(first_set, 50),
            "p99": pct(first_set, 99),
            "max": first_set[-1] if first_set else None,
        },
        "connected_before_resume": len(early),
        "never_reached": never,
        "lost": len(lost),
        "lost_examples": lost[:10],
        "duplicates": len(dup_values),
        "duplicate_examples": dup_values[:10],
        "redeliveries_dropped": redeliveries,
        "epoch_changes": epoch_changes,
        "applied_without_ok_answer": applied_unanswered,
        "applied_total": applied_total,
        "answered_ok": answered_ok,
    }


# -------------------------------------------------------------------------------- the report --


def _ratio(a, b):
    return None if a is None or not b else a / b


def build_summary(res):
    rows = []
    rounds = res["rounds"]

    def row(label, value, yard=None, ratio=None, what="", goal="", met=None, spec="%.0f"):
        rows.append(
            {
                "figure": label,
                "value": value,
                "yardstick": yard,
                "ratio": ratio,
                "yardstick_is": what,
                "goal": goal,
                "met": met,
                "spec": spec,
            }
        )

    def fig(phase, field):
        return [r["phases"][phase][field] if phase in r["phases"] else None for r in rounds]

    def pair(label, phase, yard_phase, field, what, spec="%.0f", goal="", test=None):
        ours, yard = fig(phase, field), fig(yard_phase, field)
        ratio = med([_ratio(a, b) for a, b in zip(ours, yard)])
        met = None if test is None or ratio is None else test(ratio)
        row(label, med(ours), med(yard), ratio, what, goal, met, spec)

    sync = res.get("sync_s", {})
    pool_sync = [v for k, v in sync.items() if k in HOSTS]
    row(
        "start -> all guests synced (s; pool: slowest bridge)",
        max(pool_sync) if pool_sync else None,
        sync.get("sqlite"),
        _ratio(max(pool_sync) if pool_sync else None, sync.get("sqlite")),
        "SQLite bridge",
        spec="%.1f",
    )
    single = "SQLite bridge"
    pair(
        "sends/s, pool through the owners (3 x %d conn)" % CONCURRENCY,
        "send_pool",
        "send_single",
        "rate",
        single,
        goal=">= %gx" % GOAL_SEND_RATIO,
        test=lambda x: x >= GOAL_SEND_RATIO,
    )
    pair("   p50 (ms)", "send_pool", "send_single", "p50_ms", single, "%.2f")
    pair("   p99 (ms)", "send_pool", "send_single", "p99_ms", single, "%.2f")
    pair(
        "   sends per commit (health: commits)",
        "send_pool",
        "send_single",
        "requests_per_commit",
        single,
        "%.2f",
    )
    pair(
        "sends/s, one pool bridge alone (%d conn)" % CONCURRENCY,
        "send_one",
        "send_single",
        "rate",
        single,
    )
    pair("   p50 (ms)", "send_one", "send_single", "p50_ms", single, "%.2f")
    # What three hosts would do, each with its own cores (here three bridges share two): three
    # times one bridge alone. A projection, not a measurement: it assumes the database keeps up
    # (bench/pg_fleet.py measures how far it does).
    ones, yard = fig("send_one", "rate"), fig("send_single", "rate")
    threes = [None if x is None else 3 * x for x in ones]
    row(
        "   projected: 3 hosts, each as one bridge alone",
        med(threes),
        med(yard),
        med([_ratio(a, b) for a, b in zip(threes, yard)]),
        single,
        "(projection)",
    )
    owners = "the pool through the owners"
    pair(
        "sends/s, pool through non-owners (3 x %d conn)" % CONCURRENCY,
        "send_pool_other",
        "send_pool",
        "rate",
        owners,
    )
    pair("   p50 (ms)", "send_pool_other", "send_pool", "p50_ms", owners, "%.2f")
    pair("   p99 (ms)", "send_pool_other", "send_pool", "p99_ms", owners, "%.2f")
    pair(
        "queries/s, pool through the owners (3 x %d conn)" % CONCURRENCY,
        "query_pool",
        "query_single",
        "rate",
        single,
    )
    pair("   p50 (ms)", "query_pool", "query_single", "p50_ms", single, "%.2f")
    pair("   p99 (ms)", "query_pool", "query_single", "p99_ms", single, "%.2f")
    pair(
        "queries/s, pool through non-owners (3 x %d conn)" % CONCURRENCY,
        "query_pool_other",
        "query_pool",
        "rate",
        owners,
    )
    pair("   p50 (ms)", "query_pool_other", "query_pool", "p50_ms", owners, "%.2f")
    pair("   p99 (ms)", "query_pool_other", "query_pool", "p99_ms", owners, "%.2f")
    owner = "the same queries through the owner"
    pair(
        "query through a non-owner, 1 conn: p50 (ms)",
        "seq_query_other",
        "seq_query_owner",
        "p50_ms",
        owner,
        "%.2f",
        "<= %gx" % GOAL_FORWARD_RATIO,
        lambda x: x <= GOAL_FORWARD_RATIO,
    )
    pair("   p99 (ms)", "seq_query_other", "seq_query_owner", "p99_ms", owner, "%.2f")
    pair(
        "query through the owner, 1 conn: p50 (ms)",
        "seq_query_owner",
        "seq_query_single",
        "p50_ms",
        single,
        "%.2f",
    )
    owner = "the same sends through the owner"
    pair(
        "send through a non-owner, 1 conn: p50 (ms)",
        "seq_send_other",
        "seq_send_owner",
        "p50_ms",
        owner,
        "%.2f",
    )
    pair("   p99 (ms)", "seq_send_other", "seq_send_owner", "p99_ms", owner, "%.2f")
    m = res.get("migration")
    if m and "handoff_s" in m:
        h = m["handoff_s"]

        def ms(v):
            return None if v is None else v * 1000

        row(
            "migration handoff: RESUMED_MIGRATED -> first host bytes, p50 (ms)",
            ms(h["p50"]),
            spec="%.1f",
        )
        row(
            "   p99 (ms), %d VMs" % h["n"],
            ms(h["p99"]),
            goal="< %g ms" % (GOAL_HANDOFF_P99_S * 1000),
            met=None
            if h["p99"] is None
            else h["p99"] < GOAL_HANDOFF_P99_S and not m["never_reached"],
            spec="%.1f",
        )
        row("   max (ms)", ms(h["max"]), spec="%.1f")
        s = m["handoff_first_set_s"]
        row(
            "   to the first set from the destination: p50 / p99 (ms)",
            ms(s["p50"]),
            ms(s["p99"]),
            what="(p99 in the yardstick column)",
            spec="%.1f",
        )
        row("migration: lost messages", m["lost"], goal="0", met=m["lost"] == 0)
        row(
            "migration: true duplicates (applied twice)",
            m["duplicates"],
            goal="0",
            met=m["duplicates"] == 0,
        )
        row("migration: re-deliveries dropped by the guest's seq check", m["redeliveries_dropped"])
    return rows


def print_summary(rows, out=sys.stdout):
    head = ("figure", "measured", "yardstick", "ratio", "yardstick is", "goal", "met")
    table = [head]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        yard = "" if r["yardstick"] is None else fmt(r["yardstick"], r["spec"])
        ratio = "" if r["ratio"] is None else "%.2fx" % r["ratio"]
        table.append(
            (
                r["figure"],
                fmt(r["value"], r["spec"]),
                yard,
                ratio,
                r["yardstick_is"],
                r["goal"],
                met,
            )
        )
    print_table(table, out)


def product_problems(bridges):
    """The bridges' ERROR and Traceback lines (and WARNING lines, counted), for the report."""
    out = []
    for b in bridges:
        lines = b.log_text().splitlines()
        errors = [
            line for line in lines if "ERROR" in line or "Traceback" in line or "CRITICAL" in line
        ]
        warnings = [line for line in lines if "WARNING" in line]
        if errors or warnings:
            out.append((b.name, len(errors), errors[:5], len(warnings), warnings[:3]))
    return out


# ---------------------------------------------------------------------------------- the run --


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows (under 3 minutes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (at least 3; default 3)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--guests", type=int, default=1000, help="simulated guests per bridge")
    ap.add_argument("--migrate", type=int, default=100, help="VMs migrated (default 100)")
    ap.add_argument(
        "--no-pool",
        action="store_true",
        help="the SQLite bridge alone (no PostgreSQL, no pool, no migration): a dry run",
    )
    ap.add_argument("--bridge-debug", type=int, choices=(0, 1, 2), default=1)
    ap.add_argument(
        "--profile",
        metavar="OUT",
        help="run every bridge under cProfile (OUT.hv1 ... OUT.sqlite, written when it stops); "
        "the figures of such a run are NOT representative",
    )
    ap.add_argument(
        "--limit", type=float, help="skip further rounds past this many seconds (default 540)"
    )
    ap.add_argument(
        "--phases",
        metavar="A,B",
        help="only these load phases (e.g. send_one,send_single: a quick look at one figure "
        "while working on it); default all: %s" % ",".join(PHASES),
    )
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (figures are medians over rounds)")
    args.phases = args.phases.split(",") if args.phases else list(PHASES)
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        ap.error("unknown phase(s): %s" % ", ".join(unknown))
    if args.guests < 2 or args.migrate > 3 * args.guests:
        ap.error("--guests must be at least 2 and --migrate at most 3 x --guests")
    if args.quick:
        args.warmup, args.window, args.seq_window = 0.5, 1.5, 1.0
        args.mig_lead, args.limit = 1.0, args.limit or 165.0
    else:
        args.warmup, args.window, args.seq_window = 1.0, 5.0, 3.0
        args.mig_lead, args.limit = 3.0, args.limit or 540.0
    args.mig_rate = 300.0  # sends/s in the migration's stream, 3 per migrating VM and second
    args.mig_send_timeout = 2.0
    args.mig_gap = 0.05
    args.drain_timeout = 60.0
    args.sync_timeout = 180.0
    return args


def start(run):
    a = run.args
    wd = run.workdir
    pool_cfg = None
    if not a.no_pool:
        from tests.support.postgres import PostgresCluster

        run.cluster = PostgresCluster()
        pool_cfg = {"store_url": store_url(run.cluster.create_database("ovmd_pool"))}
        pool_cfg["cert"], pool_cfg["tls_key"] = make_tls_cert(wd)
        pool_cfg["key_file"] = os.path.join(wd, "pool.key")
        write_private(pool_cfg["key_file"], base64.b64encode(os.urandom(32)).decode() + "\n")
        pool_cfg["tokens_file"] = os.path.join(wd, "tokens")
        token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        write_private(pool_cfg["tokens_file"], "bench:%s\n" % token)
        print("PostgreSQL: %s (pid %d)" % (run.cluster.dir, run.cluster.proc.pid))
    names = ([] if a.no_pool else list(HOSTS)) + ["sqlite"]
    for k, name in enumerate(names):
        d = os.path.join(wd, name)
        os.mkdir(d)
        sim = Sim(d, run.real_py, k * a.guests, a.guests)
        run.sims.append(sim)
        b = HostBridge(d, name, sim, None if name == "sqlite" else pool_cfg, a.bridge_debug)
        b.record_running()
        if name == "sqlite":
            run.single = b
        else:
            run.pool.append(b)
    bridges = run.pool + [run.single]
    for b in bridges:
        b.start(run.real_py, a.profile)
    print(
        "started: %s; guest_sims (pids %s), %d guests each"
        % (
            ", ".join("%s (pid %d)" % (b.name, b.pid) for b in bridges),
            ", ".join(str(s.pid) for s in run.sims),
            a.guests,
        )
    )
    sys.stdout.flush()
    sync = wait_synced(bridges, a.guests, a.sync_timeout)
    print("synced: %s" % ", ".join("%s %.1f s" % kv for kv in sync.items()))
    placed = None
    if run.pool:
        placed = wait_placements(run.pool, a.sync_timeout)
        print(
            "every pool bridge lists the %d VMs with their owners (+%.1f s)"
            % (len(run.pool) * a.guests, placed)
        )
    sys.stdout.flush()
    return sync, placed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loadgen"]:
        return loadgen_main(argv[1:])
    args = parse_args(argv)
    real_py = real_interpreter()
    t_begin = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ovmpool-", dir="/tmp")
    run = Run(args, real_py, workdir)
    res = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "interpreter": real_py,
        "quick": args.quick,
        "guests_per_bridge": args.guests,
        "window_s": args.window,
        "sequential_window_s": args.seq_window,
        "rounds": [],
    }
    print("pool benchmark%s" % (" (--quick)" if args.quick else ""))
    print(
        "machine: %d CPUs, load average %.2f %.2f %.2f at start; interpreter %s (via %s)"
        % ((res["cpus"],) + tuple(res["loadavg_start"]) + (real_py, VENV_PY))
    )
    print("work directory %s" % workdir)
    sys.stdout.flush()
    ok = False
    try:
        res["sync_s"], res["placements_s"] = start(run)
        res["rss_after_sync_kib"] = {b.name: proc_rss_kib(b.pid) for b in run.pool + [run.single]}
        t_round = None
        for i in range(args.rounds):
            elapsed = time.monotonic() - t_begin
            reserve = 0 if not run.pool else (30.0 if args.quick else 45.0)
            if i >= 1 and t_round is not None and elapsed + t_round + reserve > args.limit:
                print(
                    "skipping rounds %d-%d: the run would pass %.0f s"
                    % (i + 1, args.rounds, args.limit)
                )
                break
            t0 = time.monotonic()
            r = run_round(run, i)
            t_round = time.monotonic() - t0
            res["rounds"].append(r)
            print_round(r, i)
        if run.pool and args.migrate:
            res["migration"] = {}
            migration(run, res["migration"])
        res["rss_end_kib"] = {b.name: proc_rss_kib(b.pid) for b in run.pool + [run.single]}
        ok = True
    except BenchError as e:
        print("pool.py: %s" % e, file=sys.stderr)
    finally:
        res["loadavg_end"] = os.getloadavg()
        bridges = [b for b in run.pool + [run.single] if b is not None]
        res["problems"] = product_problems(bridges)
        res["stop_status"] = {}
        for b in bridges:
            try:
                res["stop_status"][b.name] = b.stop()
            except Exception as e:  # cleanup must reach every process; report and go on
                print("cleanup of %s: %s" % (b.name, e), file=sys.stderr)
        for s in run.sims:
            try:
                s.stop()
            except Exception as e:
                print("cleanup of guest_sim: %s" % e, file=sys.stderr)
        if run.cluster is not None:
            try:
                run.cluster.close()
            except Exception as e:
                print("cleanup of PostgreSQL: %s" % e, file=sys.stderr)
        res["wall_s"] = time.monotonic() - t_begin
        res["cpu_s"] = sum(
            getattr(ru, f)
            for ru in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
            for f in ("ru_utime", "ru_stime")
        )
        if args.keep:
            print("work directory kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(res, args)
    return 0 if ok else 1


def report(res, args):
    print()
    if res["rounds"]:
        rows = build_summary(res)
        res["summary"] = [{k: v for k, v in r.items() if k != "spec"} for r in rows]
        print(
            "summary: medians over %d rounds; windows %g s (sequential %g s); %d guests per "
            "bridge; ratio: the median of each round's measured / yardstick"
            % (len(res["rounds"]), args.window, args.seq_window, args.guests)
        )
        print_summary(rows)
        print()
        for phase in ("send_pool", "send_one", "send_single", "query_pool", "query_single"):
            cpus = [r["phases"][phase]["cpu_pct"] for r in res["rounds"] if phase in r["phases"]]
            if cpus:
                print(
                    "CPU in %s windows (%% of one core, medians): %s"
                    % (
                        phase,
                        ", ".join("%s %.0f" % (k, med([c.get(k) for c in cpus])) for k in cpus[0]),
                    )
                )
        bad = []
        for n, r in enumerate(res["rounds"]):
            for name, x in r["phases"].items():
                odd = {k: v for k, v in x["outcomes"].items() if k != "delivered"}
                if x["errors"] or x["stale"] or x["wrong_value"] or odd:
                    bad.append(
                        "round %d %s: errors %s, stale %d, wrong %d, outcomes %s"
                        % (n + 1, name, x["errors"], x["stale"], x["wrong_value"], x["outcomes"])
                    )
        print(
            "answers checked (sends: 200 delivered; queries: the value, stale false): %s"
            % ("all good" if not bad else "; ".join(bad))
        )
    m = res.get("migration")
    if m and "handoff_s" in m:
        st = m["stream"]
        print(
            "migration: %d migrations in %.1f s; stream %d sends (%s; errors %s), p50 %s ms, "
            "p99 %s ms; drained in %.1f s%s"
            % (
                args.migrate,
                m["migrations_s"],
                st["sent"],
                ", ".join("%s %d" % kv for kv in sorted(st["outcomes"].items())),
                st["errors"] or "none",
                fmt(st["p50_ms"], "%.1f"),
                fmt(st["p99_ms"], "%.1f"),
                m["drain_s"],
                "" if not m["undrained"] else "; NOT drained: %s" % m["undrained"],
            )
        )
        print(
            "    the guests applied %d stream messages; %d were answered delivered or queued"
            % (m["applied_total"], m["answered_ok"])
        )
        print(
            "    handoff measured for %d VMs; connected before RESUMED_MIGRATED: %d; never "
            "reached: %s; epoch changes seen by guests: %d; applied without an ok answer: %d; "
            "owners listed wrong: %s"
            % (
                m["handoff_s"]["n"],
                m["connected_before_resume"],
                m["never_reached"] or "none",
                m["epoch_changes"],
                m["applied_without_ok_answer"],
                m["owner_wrong"] or "none",
            )
        )
        if m["lost_examples"]:
            print("    lost, e.g.: %s" % m["lost_examples"][:5])
        if m["duplicate_examples"]:
            print("    duplicated, e.g.: %s" % m["duplicate_examples"][:5])
    for name, n_err, errors, n_warn, warnings in res.get("problems", []):
        print("bridge %s log: %d error lines, %d warnings" % (name, n_err, n_warn))
        for line in errors + warnings:
            print("    " + line[:300])
    print(
        "load average %.2f %.2f %.2f at the end; %.0f s wall, %.0f s CPU (this process and its "
        "children)" % (tuple(res["loadavg_end"]) + (res["wall_s"], res["cpu_s"]))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print("figures written to %s" % args.json)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # cleanup runs on a TERM too
    sys.exit(main())
