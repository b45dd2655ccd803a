"""Host bridge benchmark: the real `hostbridge` in front of 1,000 simulated guests.

Run by hand, never in CI (see bench/README.md):

    .venv/bin/python bench/bridge.py [--quick] [--json OUT.json]

One process (bench/guest_sim.py) listens on 1,000 unix sockets, the way QEMU's chardevs do, and
speaks the guest side of the protocol behind each. The real bridge (the `hostbridge` console script)
is started with a generated TOML config listing the 1,000 channels, a temporary database and a
temporary API socket. Each round starts a fresh bridge (new database) and measures:

  a. time from starting the bridge until all 1,000 guests are synced (GET /v1/health "connected";
     polled every 50 ms), and until every mirror was refreshed and saved (the database's vms rows)
  b. API throughput and latency, GET /v1/vms/{vm}/keys/{key} spread at random over every VM and
     key, from a load generator in its own process (HTTP/1.1 keep-alive connections over the unix
     socket, raw asyncio protocols) at 64 and at 16 concurrent connections (the order alternates
     from round to round), and at 1 (sequential) for the bridge's own per-query latency; each
     answer is checked (status 200, the expected value, stale false). Each phase is run against
     the bridge and against the yardstick (below) back to back, with the same queries; then one
     more sequential phase with ?fresh=true (each query a round trip to its guest)
  c. the bridge's RSS after (b)
After the rounds, with the last bridge still up:
  d. `vmmessage query VM KEY` whole-process wall time against `python -c pass` by the same
     interpreter, interleaved, 30 runs each (10 with --quick); median ratio
and then a restart of the bridge on the last round's database (mirrors on disk): time to sync.

Figures are medians over the rounds. There is no public peer for such a bridge; the yardstick is
a bare aiohttp server (`bridge.py --yardstick`, its own process, up for the whole run) answering
the same route with the same JSON from a dict over the same kind of unix socket: the HTTP
library's floor on this machine. Each (b) figure is printed beside the yardstick's, with the
median of the rounds' bridge/yardstick ratios. Also shown: a direct `get` round trip to one
simulated guest (no bridge, no HTTP).
"""

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import orjson
from guest_sim import guest_name, key_name, value_for

from ovmproto.codec import Reader, encode
from ovmproto.handshake import Handshake
from ovmproto.messages import Get, Ok

VENV_BIN = os.path.join(ROOT, ".venv", "bin")
VENV_PY = os.path.join(VENV_BIN, "python")
VENV_HOSTBRIDGE = os.path.join(VENV_BIN, "hostbridge")
VENV_VMMESSAGE = os.path.join(VENV_BIN, "vmmessage")
GUEST_SIM = os.path.join(HERE, "guest_sim.py")

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_BUDGET_S = 540.0

GOAL_SYNC_S = 10.0
GOAL_QPS_RATIO = 0.8  # bridge queries/s over the yardstick's, at 16 and 64 connections
GOAL_P99_MS = 20.0  # at 16 and 64 connections
GOAL_SEQ_P50_RATIO = 2.0  # sequential p50 over the yardstick's
GOAL_RSS_MB = 200.0
GOAL_CLI_RATIO = 2.5


# The conventions and helpers of bench/guest_agent.py (this directory is on sys.path when a bench
# script runs): the venv's real interpreter, exec'd by its real path with argv[0] naming the venv's
# python (no shim, the venv stays active); processes read from /proc and ended by pid.
from guest_agent import (
    BenchError,
    install_wheel_venv,
    interleaved_walls,
    percentile,
    proc_cpu_ticks,
    proc_rss_kib,
    proc_threads,
    real_interpreter,
    venv_python_argv,
)


def kill_pid(pid, grace=5.0):
    """TERM then KILL one process we started, by pid, and reap it; its exit status or None."""
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    except (ProcessLookupError, ChildProcessError):
        return None


def cpu_used_s(pids=()):
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for pid in pids:
        try:
            used += proc_cpu_ticks(pid) / float(CLK_TCK)
        except OSError:
            pass
    return used


# ------------------------------------------------------------------------ a tiny HTTP client --


def http_get(sock_path, target, timeout=10.0):
    """One GET over the API's unix socket (Connection: close); (status, body bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(
            ("GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % target).encode(
                "ascii"
            )
        )
        chunks = []
        while True:
            c = s.recv(1 << 20)
            if not c:
                break
            chunks.append(c)
    finally:
        s.close()
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise OSError("incomplete HTTP answer")
    return int(head[9:12]), body


# ------------------------------------------------------------------------- the load generator --
# Runs in its own process (`bridge.py --loadgen ...`) so that its CPU is not the bridge's and the
# two can use both cores. Callback-driven asyncio protocols: a reply triggers the next request on
# the same keep-alive connection, so the generator spends as little CPU per request as it can.


class _Conn(asyncio.Protocol):
    REQ = "GET /v1/vms/%s/keys/%s%s HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def __init__(self, gen):
        self.gen = gen
        self.transport = None
        self.buf = bytearray()
        self.total = -1
        self.body_at = 0
        self.status = 0
        self.t0 = 0.0
        self.expect = None
        self.busy = False
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = exc or True
        if self.busy:
            self.busy = False
            self.gen.errors["connection_lost"] = self.gen.errors.get("connection_lost", 0) + 1
            self.gen.idle_one()

    def send_next(self):
        gen = self.gen
        if gen.stopping or self.lost:
            self.busy = False
            gen.idle_one()
            return
        vm = guest_name(gen.rnd.randrange(gen.vms))
        j = gen.rnd.randrange(gen.keys)
        self.expect = value_for(vm, j)
        self.busy = True
        self.t0 = time.perf_counter()
        self.transport.write((self.REQ % (vm, key_name(j), gen.query)).encode("ascii"))

    def data_received(self, data):
        buf = self.buf
        buf += data
        if self.total < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"content-length:")
            if i < 0:
                self.gen.errors["no_content_length"] = (
                    self.gen.errors.get("no_content_length", 0) + 1
                )
                self.transport.close()
                return
            j = head.find(b"\r\n", i)
            length = int(head[i + 15 : j if j >= 0 else len(head)])
            self.body_at = end + 4
            self.total = end + 4 + length
        if len(buf) < self.total:
            return
        t1 = time.perf_counter()
        body = bytes(buf[self.body_at : self.total])
        del buf[: self.total]
        self.total = -1
        self.gen.record(self, self.status, body, t1)
        self.send_next()


class _LoadGen:
    def __init__(self, vms, keys, seed, query=""):
        self.vms = vms
        self.keys = keys
        self.query = query  # appended to each request's path: "" or "?fresh=true"
        self.rnd = random.Random(seed)
        self.stopping = False
        self.win_start = None
        self.win_end = None
        self.lat = []
        self.done_total = 0
        self.done_in_window = 0
        self.stale = 0
        self.wrong = 0
        self.errors = {}
        self._busy = 0
        self.all_idle = None

    def record(self, conn, status, body, t1):
        self.done_total += 1
        if status != 200:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        else:
            doc = orjson.loads(body)
            if doc.get("value") != conn.expect:
                self.wrong += 1
            if doc.get("stale") is not False:
                self.stale += 1
        ws = self.win_start
        if ws is not None and conn.t0 >= ws and (self.win_end is None or t1 <= self.win_end):
            self.done_in_window += 1
            self.lat.append(t1 - conn.t0)

    def idle_one(self):
        self._busy -= 1
        if self._busy <= 0 and self.all_idle is not None and not self.all_idle.done():
            self.all_idle.set_result(None)


async def drive(gen, make_conn, args):
    """Open ``args.concurrency`` connections made by ``make_conn()`` on ``args.socket``, keep them
    busy, time a window of ``args.duration`` after ``args.warmup``, then let the requests in
    flight finish. Returns the figures every load generator reports (its rate under "rate") and
    the sorted latencies (s) of the requests inside the window. "window-start" and "window-end"
    on stdout tell the parent when the window runs (it samples CPU then)."""
    loop = asyncio.get_running_loop()
    gen.all_idle = loop.create_future()
    conns = []
    for _ in range(args.concurrency):
        _, c = await loop.create_unix_connection(make_conn, args.socket)
        conns.append(c)
    gen._busy = len(conns)
    for c in conns:
        c.send_next()
    await asyncio.sleep(args.warmup)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    gen.win_start = time.perf_counter()
    sys.stdout.write("window-start\n")
    sys.stdout.flush()
    await asyncio.sleep(args.duration)
    gen.win_end = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    sys.stdout.write("window-end\n")
    sys.stdout.flush()
    gen.stopping = True
    try:
        await asyncio.wait_for(gen.all_idle, 30.0)
    except asyncio.TimeoutError:
        gen.errors["unfinished_at_end"] = gen._busy
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(gen.lat)
    window = gen.win_end - gen.win_start
    res = {
        "concurrency": args.concurrency,
        "window_s": window,
        "completed": gen.done_in_window,
        "rate": gen.done_in_window / window,
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "total_requests": gen.done_total,
        "errors": gen.errors,
        "loadgen_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }
    return res, lat


async def _loadgen_main(args):
    gen = _LoadGen(args.vms, args.keys, args.seed, "?fresh=true" if args.fresh else "")
    res, _ = await drive(gen, lambda: _Conn(gen), args)
    res["qps"] = res.pop("rate")
    res["stale"] = gen.stale
    res["wrong_value"] = gen.wrong
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


def loadgen_main(argv):
    ap = argparse.ArgumentParser(prog="bridge.py --loadgen")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--vms", type=int, required=True)
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="ask with ?fresh=true (a round trip)")
    args = ap.parse_args(argv)
    asyncio.run(_loadgen_main(args))
    return 0


# ---------------------------------------------------------------------------- the yardstick --
# A bare aiohttp server (`bridge.py --yardstick ...`, its own process): the same unix-socket setup
# as the bridge's API (a listening socket handed to a SockSite, no access log), the same route
# shape, and the same JSON answer built from a dict by the same JSON library (ovmproto.jsonlib,
# orjson when installed). No middleware, no guest, no bridge: what aiohttp itself costs per
# query on this machine, the floor the bridge is compared with.


async def _yardstick_main(args):
    from aiohttp import web

    from ovmproto import jsonlib

    table = {}
    for i in range(args.vms):
        vm = guest_name(i)
        for j in range(args.keys):
            table[(vm, key_name(j))] = value_for(vm, j)
    seen = time.time()

    async def get_key(request):
        info = request.match_info
        vm, key = info["vm"], info["key"]
        value = table.get((vm, key))
        if value is None:
            raise web.HTTPNotFound()
        doc = {
            "vm": vm,
            "key": key,
            "value": value,
            "ts": seen,
            "origin": "guest",
            "stale": False,
            "last_seen": seen,
        }
        return web.Response(body=jsonlib.dumps(doc), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/vms/{vm}/keys/{key:.+}", get_key)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(args.socket)
    sock.listen(128)  # the bridge's backlog (hostbridge.api._start_unix)
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stop.wait()
    await runner.cleanup()


def yardstick_main(argv):
    ap = argparse.ArgumentParser(prog="bridge.py --yardstick")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--vms", type=int, required=True)
    ap.add_argument("--keys", type=int, required=True)
    args = ap.parse_args(argv)
    asyncio.run(_yardstick_main(args))
    return 0


class Yardstick:
    """The bare aiohttp server as a process, up for the whole run; stop() ends it by pid."""

    def __init__(self, workdir, real_py, vms, keys):
        self.socket = os.path.join(workdir, "yardstick.sock")
        self.log_path = os.path.join(workdir, "yardstick.log")
        argv, exe = venv_python_argv(
            real_py,
            [
                os.path.abspath(__file__),
                "--yardstick",
                "--socket",
                self.socket,
                "--vms",
                str(vms),
                "--keys",
                str(keys),
            ],
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, executable=exe, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log
        )
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            raise BenchError("the yardstick did not start (%r); see %s" % (line, self.log_path))

    def stop(self):
        status = kill_pid(self.pid)
        self._log.close()
        self.proc.stdout.close()
        return status


# --------------------------------------------------------------------------------- the parts --


class GuestSim:
    def __init__(self, workdir, real_py, count, keys):
        self.dir = os.path.join(workdir, "guests")
        os.mkdir(self.dir)
        self.count = count
        self.keys = keys
        self.stats_path = os.path.join(workdir, "guest_sim.stats.json")
        self.log_path = os.path.join(workdir, "guest_sim.log")
        argv, exe = venv_python_argv(
            real_py,
            [
                GUEST_SIM,
                "--dir",
                self.dir,
                "--count",
                str(count),
                "--keys",
                str(keys),
                "--extra",
                "1",
                "--stats",
                self.stats_path,
            ],
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, executable=exe, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log
        )
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            raise BenchError("guest_sim did not start (%r); see %s" % (line, self.log_path))

    def path(self, i):
        return os.path.join(self.dir, "g%04d.sock" % i)

    def stop(self):
        status = kill_pid(self.pid)
        self._log.close()
        self.proc.stdout.close()
        try:
            with open(self.stats_path) as f:
                return status, json.load(f)
        except (OSError, ValueError):
            return status, None


class Bridge:
    """One run of the real bridge; stop() ends it by pid."""

    def __init__(self, workdir, tag, config_path, db, api_socket, opts, real_py):
        self.log_path = os.path.join(workdir, "hostbridge-%s.log" % tag)
        self.db = db
        self.api_socket = api_socket
        self._log = open(self.log_path, "wb")
        flags = ["--config", config_path, "-d", str(opts.bridge_debug)]
        script = opts.bridge_script or VENV_HOSTBRIDGE
        if opts.profile:
            # The same script under cProfile (much slower: for finding hot spots only).
            profile = "%s.%s" % (opts.profile, tag)
            argv, exe = venv_python_argv(real_py, ["-m", "cProfile", "-o", profile, script] + flags)
        elif opts.bridge_script:
            argv, exe = venv_python_argv(real_py, [script] + flags)
        else:
            argv, exe = [VENV_HOSTBRIDGE] + flags, None  # the console script, as deployed
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            executable=exe,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=8):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])

    def health(self):
        try:
            status, body = http_get(self.api_socket, "/v1/health", 5.0)
        except OSError:
            return None
        return orjson.loads(body) if status == 200 else None

    def stop(self):
        t0 = time.monotonic()
        status = kill_pid(self.pid, grace=30.0)
        self._log.close()
        return status, time.monotonic() - t0


def write_config(path, db, api_socket, sim):
    lines = [
        "[bridge]",
        "db = %s" % json.dumps(db),
        "api_socket = %s" % json.dumps(api_socket),
        "discover = false",
        "",
    ]
    for i in range(sim.count):
        lines += [
            "[[vm]]",
            "name = %s" % json.dumps(guest_name(i)),
            "channel = %s" % json.dumps("unix:" + sim.path(i)),
            "",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def mirrored_count(db, keys):
    """VMs whose mirror was refreshed and saved (the flush writes the guest's gid and gseq)."""
    try:
        con = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=1.0)
        try:
            return con.execute(
                "SELECT COUNT(*) FROM vms WHERE gid IS NOT NULL AND gseq >= ?", (keys,)
            ).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def wait_synced(bridge, n, keys, timeout, check_mirror=True):
    """Seconds from the bridge's start to: API up, all n synced, all n mirrors saved."""
    t0 = bridge.t_start
    t_api = t_sync = t_mirror = None
    deadline = t0 + timeout
    last_connected = 0
    next_db_check = 0.0
    while time.monotonic() < deadline:
        if not bridge.alive():
            raise BenchError(
                "the bridge exited with status %s during startup:\n%s"
                % (bridge.proc.poll(), bridge.log_tail())
            )
        now = time.monotonic()
        if t_sync is None:
            h = bridge.health()
            if h is not None:
                if t_api is None:
                    t_api = time.monotonic() - t0
                last_connected = h.get("connected", 0)
                if last_connected >= n:
                    t_sync = time.monotonic() - t0
        if check_mirror and t_mirror is None and t_api is not None and now >= next_db_check:
            if mirrored_count(bridge.db, keys) >= n:
                t_mirror = time.monotonic() - t0
            next_db_check = now + 0.25
        if t_sync is not None and (t_mirror is not None or not check_mirror):
            break
        time.sleep(0.05)
    if t_sync is None:
        raise BenchError(
            "only %d of %d guests synced within %.0f s:\n%s"
            % (last_connected, n, timeout, bridge.log_tail())
        )
    return {"api_up_s": t_api, "synced_s": t_sync, "mirrored_s": t_mirror}


def direct_round_trips(path, n, warmup=100):
    """Sequential `get` round trips straight to one simulated guest (no bridge): the floor."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(path)
    reader = Reader()
    try:
        hs = Handshake(request_id=1, nonce=os.urandom(8).hex(), epoch="bench-direct")
        s.sendall(hs.opening())
        synced = False
        while not synced:
            for ev in reader.feed(s.recv(65536)):
                if hs.accept(ev) is not None:
                    synced = True
        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + n):
            rid = i + 10
            req = encode(Get(id=rid, key=key_name(0)))
            t0 = clock()
            s.sendall(req)
            rep = None
            while rep is None:
                for ev in reader.feed(s.recv(65536)):
                    if getattr(ev, "id", None) == rid:
                        rep = ev
            t1 = clock()
            if type(rep) is not Ok:
                raise BenchError("direct get failed: %r" % (rep,))
            if i >= warmup:
                samples.append((t1 - t0) / 1000.0)
    finally:
        s.close()
    samples.sort()
    return {"p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99), "n": n}


def run_loadgen(real_py, script, loadgen_args, pids, probe=None):
    """Run ``script --loadgen LOADGEN_ARGS`` (a load generator built on drive()) in its own process
    and sample every process in ``pids`` (name -> pid) when its window starts and ends.

    Returns (its result, the window's wall seconds, {name: CPU seconds in the window}, (probe()
    at the start, probe() at the end)); ``probe``, when given, is read just outside the samples.
    """
    argv, exe = venv_python_argv(real_py, [os.path.abspath(script), "--loadgen", *loadgen_args])
    proc = subprocess.Popen(
        argv,
        executable=exe,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def expect(word):
            line = proc.stdout.readline().decode().strip()
            if line != word:
                err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise BenchError(
                    "load generator: expected %r, got %r; %s"
                    % (word, line, err[-1:] or "no error output")
                )

        expect("window-start")
        p0 = probe() if probe else None
        t0 = time.monotonic()
        cpu0 = {k: proc_cpu_ticks(pid) for k, pid in pids.items()}
        expect("window-end")
        t1 = time.monotonic()
        cpu1 = {k: proc_cpu_ticks(pid) for k, pid in pids.items()}
        p1 = probe() if probe else None
        out = proc.stdout.readline()
        if not out:
            err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise BenchError("load generator gave no result: %s" % (err[-1:] or "?"))
        res = json.loads(out)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
    cpu = {k: (cpu1[k] - cpu0[k]) / float(CLK_TCK) for k in pids}
    return res, t1 - t0, cpu, (p0, p1)


def run_load(
    real_py, api_socket, concurrency, n_vms, keys, warmup, duration, seed, pids, fresh=False
):
    """One load phase in a separate process; its result plus every process's CPU in the window.
    ``fresh``: every query with ?fresh=true (a round trip to the guest)."""
    args = ["--socket", api_socket, "--concurrency", str(concurrency), "--vms", str(n_vms)]
    args += ["--keys", str(keys), "--warmup", str(warmup), "--duration", str(duration)]
    args += ["--seed", str(seed)] + (["--fresh"] if fresh else [])
    res, wall, cpu, _ = run_loadgen(real_py, __file__, args, pids)
    res["cpu_pct"] = {k: cpu[k] * 100.0 / wall for k in pids}
    res["cpu_pct"]["loadgen"] = res["loadgen_cpu_s"] * 100.0 / res["window_s"]
    return res


def cli_startup(real_py, api_socket, runs, workdir, warmup=3):
    """Wall time of `vmmessage query VM KEY` vs `python -c pass`, interleaved, both from a fresh
    venv with the project installed from its wheel, as a host installs it (the development venv's
    editable-install hook slows every interpreter start, which would flatter the ratio)."""
    venv_bin = install_wheel_venv(workdir, real_py)  # the guest benchmark's installation
    env = dict(os.environ, VMMESSAGE_BRIDGE=api_socket)
    env.pop("PYTHONPATH", None)
    vm, key = guest_name(1), key_name(1)
    expect = "returned value '%s'" % value_for(vm, 1)
    return interleaved_walls(
        ([os.path.join(venv_bin, "python"), "-c", "pass"], real_py),
        ([os.path.join(venv_bin, "vmmessage"), "query", vm, key], None),
        lambda out: expect in out,
        env,
        runs,
        "vmmessage_query",
        warmup,
    )


# -------------------------------------------------------------------------------- the report --


def fmt(v, spec="%.0f"):
    return "n/a" if v is None else spec % v


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def build_summary(res):
    rounds = res["rounds"]
    rows = []

    def row(label, ours, goal, met=None, spec="%.0f", yard=None, ratio=None):
        rows.append(
            {
                "figure": label,
                "ours": ours,
                "yardstick": yard,
                "ratio": ratio,
                "goal": goal,
                "met": met,
                "spec": spec,
            }
        )

    sync = med([r["sync"]["synced_s"] for r in rounds])
    row(
        "a. start -> all %d guests synced (s)" % res["guests"],
        sync,
        "< %g s" % GOAL_SYNC_S,
        None if sync is None else sync < GOAL_SYNC_S,
        "%.2f",
    )
    row(
        "   start -> API answers (s)",
        med([r["sync"]["api_up_s"] for r in rounds]),
        "-",
        spec="%.2f",
    )
    row(
        "   start -> all mirrors refreshed and saved (s)",
        med([r["sync"]["mirrored_s"] for r in rounds]),
        "-",
        spec="%.2f",
    )
    rs = res.get("restart")
    if rs:
        row("   restart on the same database -> all synced (s)", rs["synced_s"], "-", spec="%.2f")

    def figure(c, name):
        """(bridge median, yardstick median, median of the rounds' bridge/yardstick ratios)."""
        ours = [r["load"][str(c)][name] for r in rounds]
        yard = [r["yardstick"][str(c)][name] for r in rounds]
        return med(ours), med(yard), med([_ratio(a, b) for a, b in zip(ours, yard)])

    for c in res["concurrencies"]:
        qps, yqps, rqps = figure(c, "qps")
        p50, yp50, rp50 = figure(c, "p50_ms")
        p99, yp99, rp99 = figure(c, "p99_ms")
        if c == 1:
            row("b. GET key, 1 conn: queries/s", qps, "-", yard=yqps, ratio=rqps)
            row(
                "b. GET key, 1 conn: p50 (ms)",
                p50,
                "<= %gx yardstick" % GOAL_SEQ_P50_RATIO,
                None if rp50 is None else rp50 <= GOAL_SEQ_P50_RATIO,
                "%.2f",
                yp50,
                rp50,
            )
            row("b. GET key, 1 conn: p99 (ms)", p99, "-", None, "%.2f", yp99, rp99)
            continue
        row(
            "b. GET key, %d conn: queries/s" % c,
            qps,
            ">= %gx yardstick" % GOAL_QPS_RATIO,
            None if rqps is None else rqps >= GOAL_QPS_RATIO,
            yard=yqps,
            ratio=rqps,
        )
        row("b. GET key, %d conn: p50 (ms)" % c, p50, "-", None, "%.2f", yp50, rp50)
        row(
            "b. GET key, %d conn: p99 (ms)" % c,
            p99,
            "< %g ms" % GOAL_P99_MS,
            None if p99 is None else p99 < GOAL_P99_MS,
            "%.2f",
            yp99,
            rp99,
        )
    fresh = [r["fresh"]["p50_ms"] for r in rounds]
    row(
        "   GET key?fresh=true (a round trip), 1 conn: p50 (ms)",
        med(fresh),
        "-",
        None,
        "%.2f",
        med([r["yardstick"]["1"]["p50_ms"] for r in rounds]),
        med([_ratio(a, r["yardstick"]["1"]["p50_ms"]) for a, r in zip(fresh, rounds)]),
    )
    direct = med([r["direct"]["p50_us"] for r in rounds])
    row(
        "   a direct get to one guest, no bridge, p50 (ms)",
        None if direct is None else direct / 1000,
        "-",
        spec="%.3f",
    )
    rss = med([r["rss_after_load_kib"] for r in rounds])
    rss_mb = None if rss is None else rss * 1024 / 1e6
    row(
        "c. bridge RSS after (b) (MB = 10^6 B)",
        rss_mb,
        "< %g MB" % GOAL_RSS_MB,
        None if rss_mb is None else rss_mb < GOAL_RSS_MB,
        "%.1f",
    )
    cli = res.get("cli")
    if cli:
        row(
            "d. `vmmessage query` wall / `python -c pass`",
            cli["ratio"],
            "<= %g" % GOAL_CLI_RATIO,
            cli["ratio"] <= GOAL_CLI_RATIO,
            "%.2fx",
        )
        row("   `vmmessage query` wall (ms)", cli["vmmessage_query_ms"], "-", spec="%.1f")
        row("   `python -c pass` wall (ms)", cli["python_c_pass_ms"], "-", spec="%.1f")
    return rows


def print_summary(rows, out=sys.stdout):
    head = ("figure", "bridge", "yardstick", "ratio", "goal", "met")
    table = [head]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        yard = "" if r["yardstick"] is None else fmt(r["yardstick"], r["spec"])
        ratio = "" if r["ratio"] is None else "%.2fx" % r["ratio"]
        table.append((r["figure"], fmt(r["ours"], r["spec"]), yard, ratio, r["goal"], met))
    print_table(table, out)


def print_table(table, out=sys.stdout, numeric=(1, 2, 3)):
    """Rows of cells in aligned columns, the first row a heading underlined; the columns in
    ``numeric`` right-aligned."""
    widths = [max(len(str(t[i])) for t in table) for i in range(len(table[0]))]
    for n, t in enumerate(table):
        cells = [
            str(c).rjust(widths[i]) if i in numeric else str(c).ljust(widths[i])
            for i, c in enumerate(t)
        ]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_round(r, i):
    s = r["sync"]
    print(
        "round %d: synced %.2f s (API up %.2f s, mirrors saved %s s); direct get p50 %.0f us; "
        "RSS %.1f MB after sync, %.1f MB after load; bridge stop %.2f s (status %s)"
        % (
            i + 1,
            s["synced_s"],
            s["api_up_s"],
            fmt(s["mirrored_s"], "%.2f"),
            r["direct"]["p50_us"],
            r["rss_after_sync_kib"] * 1024 / 1e6,
            r["rss_after_load_kib"] * 1024 / 1e6,
            r.get("stop_s", float("nan")),
            r.get("stop_status"),
        )
    )
    for c in r["order"]:
        for what, name in (
            ("load", "bridge   "),
            ("yardstick", "yardstick"),
            ("fresh", "fresh    "),
        ):
            if what == "fresh":
                if c != 1:
                    continue
                x = r["fresh"]
            else:
                x = r[what][str(c)]
            cpu = x["cpu_pct"]
            if what != "yardstick":
                who = "bridge %.0f, guest_sim %.0f" % (cpu["bridge"], cpu["guest_sim"])
            else:
                who = "yardstick %.0f" % cpu["yardstick"]
            print(
                "    %2d conn %s: %6.0f q/s  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  "
                "stale %d  wrong %d  errors %s  CPU%% %s, loadgen %.0f"
                % (
                    c,
                    name,
                    x["qps"],
                    x["p50_ms"],
                    x["p99_ms"],
                    x["max_ms"],
                    x["stale"],
                    x["wrong_value"],
                    x["errors"] or "none",
                    who,
                    cpu["loadgen"],
                )
            )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- the run --


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (~1 minute)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (at least 3; default 3)")
    ap.add_argument("--guests", type=int, default=1000, help="simulated guests (default 1000)")
    ap.add_argument("--keys", type=int, default=4, help="keys pre-set in each guest (default 4)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--bridge-debug",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="the bridge's -d level (default 1, its own default: info, which includes "
        "aiohttp's access log line per request)",
    )
    ap.add_argument(
        "--bridge-script",
        metavar="FILE",
        help="run this Python script with the bridge's flags instead of the hostbridge "
        "console script (e.g. a patched variant, for comparison)",
    )
    ap.add_argument(
        "--profile",
        metavar="OUT",
        help="run every bridge under cProfile (OUT.round1 ...) and print the hot spots "
        "of the last round; the figures of such a run are NOT representative",
    )
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (figures are medians over rounds)")
    if args.guests < 2 or args.keys < 1:
        ap.error("--guests must be at least 2 and --keys at least 1")
    if args.quick:
        args.warmup, args.duration, args.seq_duration, args.cli_runs = 0.5, 2.0, 1.0, 10
    else:
        args.warmup, args.duration, args.seq_duration, args.cli_runs = 1.0, 8.0, 3.0, 30
    args.sync_timeout = 90.0
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loadgen"]:
        return loadgen_main(argv[1:])
    if argv[:1] == ["--yardstick"]:
        return yardstick_main(argv[1:])
    args = parse_args(argv)
    real_py = real_interpreter()
    for exe in (VENV_HOSTBRIDGE, VENV_VMMESSAGE):
        if not os.path.exists(exe):
            raise SystemExit("bridge.py: %s does not exist (run scripts/bootstrap.sh)" % exe)
    workdir = tempfile.mkdtemp(prefix="ovmbridge-", dir="/tmp")
    api_socket = os.path.join(workdir, "api.sock")
    sim = bridge = yard = None
    concurrencies = [64, 16]
    res = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "interpreter": real_py,
        "quick": args.quick,
        "guests": args.guests,
        "keys_per_guest": args.keys,
        "rounds": [],
        "concurrencies": concurrencies + [1],
        "window_s": args.duration,
        "sequential_window_s": args.seq_duration,
    }
    print(
        "host bridge benchmark: the real hostbridge, %d simulated guests (%d keys each)%s"
        % (args.guests, args.keys, " (--quick)" if args.quick else "")
    )
    print(
        "machine: %d CPUs, load average %.2f %.2f %.2f at start; interpreter %s (via %s)"
        % ((res["cpus"],) + tuple(res["loadavg_start"]) + (real_py, VENV_PY))
    )
    res["bridge_command"] = "%s --config FILE -d %d" % (
        args.bridge_script or VENV_HOSTBRIDGE,
        args.bridge_debug,
    )
    print("bridge: %s%s" % (res["bridge_command"], " (under cProfile)" if args.profile else ""))
    sys.stdout.flush()
    try:
        sim = GuestSim(workdir, real_py, args.guests, args.keys)
        print(
            "guest_sim (pid %d) listens on %d sockets in %s" % (sim.pid, args.guests + 1, sim.dir)
        )
        yard = Yardstick(workdir, real_py, args.guests, args.keys)
        print("yardstick: a bare aiohttp server (pid %d) on %s" % (yard.pid, yard.socket))
        res["guest_sim_rss_kib"] = proc_rss_kib(sim.pid)
        sys.stdout.flush()
        last_db = None
        for i in range(args.rounds):
            rdir = os.path.join(workdir, "round%d" % (i + 1))
            os.mkdir(rdir)
            db = os.path.join(rdir, "bridge.sqlite3")
            cfg = os.path.join(rdir, "bridge.toml")
            write_config(cfg, db, api_socket, sim)
            r = {
                "order": concurrencies if i % 2 == 0 else list(reversed(concurrencies)),
                "load": {},
            }
            bridge = Bridge(workdir, "round%d" % (i + 1), cfg, db, api_socket, args, real_py)
            r["sync"] = wait_synced(bridge, args.guests, args.keys, args.sync_timeout)
            r["rss_after_sync_kib"] = proc_rss_kib(bridge.pid)
            r["direct"] = direct_round_trips(sim.path(args.guests), 1000)
            r["yardstick"] = {}
            targets = {
                "load": (api_socket, {"bridge": bridge.pid, "guest_sim": sim.pid}),
                "yardstick": (yard.socket, {"yardstick": yard.pid}),
            }
            # The sequential run first: it measures the bridge's own cost per query, unloaded.
            # Each phase runs against the bridge and against the yardstick back to back, with the
            # same seed (the same queries), the one that goes first alternating phase by phase.
            phases = [(1, args.seq_duration)] + [(c, args.duration) for c in r["order"]]
            for n, (c, duration) in enumerate(phases):
                pair = ("load", "yardstick") if (i + n) % 2 == 0 else ("yardstick", "load")
                for what in pair:
                    sock_path, pids = targets[what]
                    r[what][str(c)] = run_load(
                        real_py,
                        sock_path,
                        c,
                        args.guests,
                        args.keys,
                        args.warmup,
                        duration,
                        100 * i + c,
                        pids,
                    )
            # What a query costs when it takes a round trip to the guest (?fresh=true, or the
            # mirror cannot answer): sequential, the bridge only.
            r["fresh"] = run_load(
                real_py,
                api_socket,
                1,
                args.guests,
                args.keys,
                args.warmup,
                args.seq_duration,
                100 * i + 1,
                targets["load"][1],
                fresh=True,
            )
            r["rss_after_load_kib"] = proc_rss_kib(bridge.pid)
            r["threads"] = proc_threads(bridge.pid)
            r["bridge_cpu_s"] = proc_cpu_ticks(bridge.pid) / float(CLK_TCK)
            last = i == args.rounds - 1
            if last:
                res["cli"] = cli_startup(real_py, api_socket, args.cli_runs, rdir)
            r["stop_status"], r["stop_s"] = bridge.stop()
            bridge = None
            r["order"] = [1] + r["order"]
            res["rounds"].append(r)
            print_round(r, i)
            last_db = (cfg, db)
            used = cpu_used_s([sim.pid])
            if used > CPU_BUDGET_S:
                raise BenchError(
                    "CPU budget exceeded (%.0f s of %.0f s); stopping" % (used, CPU_BUDGET_S)
                )
        # A restart on the last round's database: mirrors and epochs are on disk already.
        bridge = Bridge(workdir, "restart", last_db[0], last_db[1], api_socket, args, real_py)
        res["restart"] = wait_synced(
            bridge, args.guests, args.keys, args.sync_timeout, check_mirror=False
        )
        res["restart"]["stop_status"], res["restart"]["stop_s"] = bridge.stop()
        bridge = None
        print(
            "restart on the same database: synced %.2f s (API up %.2f s)"
            % (res["restart"]["synced_s"], res["restart"]["api_up_s"])
        )
        res["loadavg_end"] = os.getloadavg()
        res["guest_sim_cpu_s"] = proc_cpu_ticks(sim.pid) / float(CLK_TCK)
        res["cpu_used_s"] = cpu_used_s([sim.pid])
    except BenchError as e:
        print("benchmark failed: %s" % e, file=sys.stderr)
        return 1
    finally:
        if bridge is not None:
            try:
                bridge.stop()
            except Exception as e:  # cleanup must reach every process; report and go on
                print("cleanup of the bridge: %s" % e, file=sys.stderr)
        if yard is not None:
            try:
                res["yardstick_exit"] = yard.stop()
            except Exception as e:
                print("cleanup of the yardstick: %s" % e, file=sys.stderr)
        if sim is not None:
            try:
                res["guest_sim_exit"], res["guest_sim_stats"] = sim.stop()
            except Exception as e:
                print("cleanup of guest_sim: %s" % e, file=sys.stderr)
        if args.keep:
            print("work directory kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = build_summary(res)
    res["summary"] = [{k: v for k, v in r.items() if k != "spec"} for r in rows]
    print()
    print(
        "summary: medians over %d rounds (each a fresh bridge and database); load windows %g s "
        "(sequential %g s); %d guests x %d keys"
        % (args.rounds, args.duration, args.seq_duration, args.guests, args.keys)
    )
    print_summary(rows)
    print()
    for c in res["concurrencies"]:
        cpu = [r["load"][str(c)]["cpu_pct"] for r in res["rounds"]]
        print(
            "CPU during the %d-connection windows (%% of one core; 200%% = both cores): bridge "
            "%.0f%%, guest_sim %.0f%%, load generator %.0f%%; the yardstick's windows: "
            "yardstick %.0f%%, load generator %.0f%% (medians)"
            % (
                c,
                med([x["bridge"] for x in cpu]),
                med([x["guest_sim"] for x in cpu]),
                med([x["loadgen"] for x in cpu]),
                med([r["yardstick"][str(c)]["cpu_pct"]["yardstick"] for r in res["rounds"]]),
                med([r["yardstick"][str(c)]["cpu_pct"]["loadgen"] for r in res["rounds"]]),
            )
        )
    problems = []
    for n, r in enumerate(res["rounds"]):
        for what in ("load", "yardstick", "fresh"):
            for c, x in r[what].items() if what != "fresh" else [("1", r["fresh"])]:
                if x["stale"] or x["wrong_value"] or x["errors"]:
                    problems.append(
                        "round %d, %s, %s conn: stale %d, wrong %d, errors %s"
                        % (
                            n + 1,
                            "bridge" if what == "load" else what,
                            c,
                            x["stale"],
                            x["wrong_value"],
                            x["errors"],
                        )
                    )
    print(
        "answers checked, bridge and yardstick (status 200, the expected value, stale false): %s"
        % ("all good" if not problems else "; ".join(problems))
    )
    stats = res.get("guest_sim_stats")
    if stats:
        total_api = sum(
            x["total_requests"]
            for r in res["rounds"]
            for x in list(r["load"].values()) + [r["fresh"]]
        )
        print(
            "guest_sim answered: %s; connections accepted %d (API key queries sent in all: %d)"
            % (
                ", ".join("%s %d" % kv for kv in sorted(stats["requests"].items())),
                stats["connects"],
                total_api,
            )
        )
    print(
        "peer: there is no public peer for a host bridge. Yardstick: a bare aiohttp server on the "
        "same kind of unix socket answering the same JSON from a dict, driven by the same load "
        "generator with the same queries, interleaved with the bridge's phases; ratio = bridge / "
        "yardstick, the median of the rounds' ratios. A direct get round trip to one simulated "
        "guest (no bridge, no HTTP): p50 %.0f us."
        % med([r["direct"]["p50_us"] for r in res["rounds"]])
    )
    if "cli" in res:
        c = res["cli"]
        print(
            "d: %d runs each, interleaved; medians vmmessage query %.1f ms, python -c pass %.1f ms "
            "(minima %.1f / %.1f ms)"
            % (
                c["runs"],
                c["vmmessage_query_ms"],
                c["python_c_pass_ms"],
                c["vmmessage_query_min_ms"],
                c["python_c_pass_min_ms"],
            )
        )
    print(
        "bridge threads after load: %s; guest_sim RSS at start %.1f MB"
        % (
            ", ".join(str(r["threads"]) for r in res["rounds"]),
            res["guest_sim_rss_kib"] * 1024 / 1e6,
        )
    )
    print(
        "load average %.2f %.2f %.2f at start, %.2f %.2f %.2f at end; CPU used by this run "
        "(harness + children): %.0f s"
        % (tuple(res["loadavg_start"]) + tuple(res["loadavg_end"]) + (res["cpu_used_s"],))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print("figures written to %s" % args.json)
    if args.profile:
        print_profile("%s.round%d" % (args.profile, args.rounds))
    return 0


def print_profile(path, n=30):
    import pstats

    print()
    print("PROFILED RUN: the bridges ran under cProfile; the figures above are not representative.")
    try:
        stats = pstats.Stats(path)
    except OSError as e:
        print("no profile in %s: %s" % (path, e))
        return
    stats.sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumulative").print_stats(n)


if __name__ == "__main__":
    sys.exit(main())
