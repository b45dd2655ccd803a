"""Sends benchmark: what a message costs, from a guest's own store to the bridge's group commits.

Run by hand, never in CI (see bench/README.md):

    .venv/bin/python bench/sends.py [--quick] [--rounds N] [--json OUT.json] [--keep]

Figures, each printed beside a yardstick measured in the same run (medians over the rounds;
ratios are medians of each round's ratio):

  1. guest sets through the real `ovmd` daemon's local unix socket (the console script, on a raw
     pty as bench/guest_agent.py runs it, its state directory on disk under /var/tmp), one after
     the other, into an empty cache and into a full one (1,024 keys, 1,023 of them with
     8,192-byte values). The same small key is set again and again in both, so only the cache
     size differs; then the same with an 8 KB value. The two daemons run side by side and the
     sets alternate between them every 0.25 s. Yardstick: the empty cache; ratio full/empty.
  2. bridge sends to one synced simulated guest (bench/guest_sim.py), one after the other:
     `POST /v1/vms/{vm}/messages` answered "delivered"; sends/s, p50, p99. Yardstick: the
     guest's own sequential set rate, figure 1 (small key, empty cache).
  3. bridge sends to 1,000 simulated guests, 16 and 64 client connections, each send to a guest
     drawn at random: sends/s, p50, p99, and how many sends each commit served (the bridge's
     /v1/health counters `commits` and `commit_units`, read at the window's edges).
  4. figures 2 and 3 with group commits off (HOSTBRIDGE_GROUP_COMMIT=0 in the bridge's
     environment): two bridges, on and off, each with its own guest_sim, are up at the same
     time, and each phase runs in four windows, A B B A (A alternating between on and off from
     phase to phase). This is the yardstick of figures 2 and 3 (ratio on/off).

Everything runs on this machine: unix sockets and a pty, no network. Every wait has a deadline,
and a CPU budget stops the run.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import orjson
from bridge import (
    VENV_HOSTBRIDGE,
    Bridge,
    GuestSim,
    _Conn,
    _LoadGen,
    cpu_used_s,
    drive,
    fmt,
    http_get,
    med,
    print_table,
    run_loadgen,
    wait_synced,
    write_config,
)
from guest_agent import (
    VALUE_8K,
    VENV_OVMD,
    BenchError,
    Ours,
    percentile,
    proc_rss_kib,
    real_interpreter,
)
from guest_sim import guest_name

from guestagent.client import Client as AgentClient
from guestagent.client import ClientError
from hostbridge.groupcommit import ENVIRONMENT_SWITCH

CPU_BUDGET_S = 540.0
FILL_DEADLINE_S = 600.0  # filling the full cache; today's whole-file rewrite takes ~30-60 s
GUEST_MAX_KEYS = 1024  # the agent's default quota: the full cache is at it
KEY_SMALL = "com.example.bench.small"
KEY_8K = "com.example.bench.value8k"
FILLERS = GUEST_MAX_KEYS - 2  # with the two keys above: a cache at its quota
SEND_KEYS = 4  # a send sets bench.s0..3 in its guest: the mirror stays small


def budget(pids=()):
    used = cpu_used_s(pids)
    if used > CPU_BUDGET_S:
        raise BenchError("CPU budget exceeded (%.0f s of %.0f s); stopping" % (used, CPU_BUDGET_S))
    return used


def fs_type(path):
    done = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _ratio(a, b):
    return None if a is None or not b else a / b


# ----------------------------------------------------------------- figure 1: the guest's store --


class Agent:
    """`ovmd --daemon` (bench/guest_agent.py's Ours: the console script on a raw pty) with its
    state on disk, and a client of its local socket. No host syncs with it: a host's `changed`
    announcements would only fill a pty nobody reads."""

    def __init__(self, workdir, real_py, name):
        d = os.path.join(workdir, name)
        os.mkdir(d)
        self.name = name
        self.peer = Ours(d, real_py, "script")
        self.peer.start()
        self.client = self._connect()
        self.sets = 0

    def _connect(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.peer.proc.poll() is not None:
                raise BenchError(
                    "ovmd (%s) exited with status %s; its log:\n%s"
                    % (self.name, self.peer.proc.poll(), self.peer.log_tail())
                )
            try:
                c = AgentClient(self.peer.socket, timeout=120.0)
                c.connect()
                c.call("ping")
                return c
            except ClientError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        "ovmd (%s) did not answer on %s within %.0f s"
                        % (self.name, self.peer.socket, timeout)
                    ) from None
                time.sleep(0.05)

    def set(self, key, value):
        self.client.call("set", key=key, value=value)
        self.sets += 1

    def stop(self):
        self.client.close()
        self.peer.stop()


def small_value(n):
    return "v%d" % n


def big_value(n):
    tag = "%08d" % n  # each set a new value, of exactly 8,192 bytes
    return tag + VALUE_8K[len(tag) :]


def fill(agent):
    """Bring ``agent``'s cache to its quota: the two bench keys, then FILLERS keys of 8 KB."""
    agent.set(KEY_SMALL, small_value(0))
    agent.set(KEY_8K, big_value(0))
    t0 = time.monotonic()
    for i in range(FILLERS):
        agent.set("com.example.bench.fill%04d" % i, big_value(i))
        if time.monotonic() - t0 > FILL_DEADLINE_S:
            raise BenchError("filling the cache took over %.0f s; stopping" % FILL_DEADLINE_S)
        if i % 256 == 255:
            print("    filled %d of %d keys (%.0f s)" % (i + 1, FILLERS, time.monotonic() - t0))
            sys.stdout.flush()
    return time.monotonic() - t0


SLICE_S = 0.25  # figure 1 alternates the two caches this often: a drift of the disk hits both


def guest_sets(agents, order, key, make_value, duration, warmup=3):
    """Sequential sets of ``key`` into each of ``agents`` for ``duration`` seconds each, in
    slices of SLICE_S that alternate between them: {name: sets/s, p50 and p99 (ms)}."""
    for name in order:
        for _ in range(warmup):
            agents[name].set(key, make_value(agents[name].sets))
    lat = {name: [] for name in order}
    spent = dict.fromkeys(order, 0.0)
    clock = time.perf_counter
    for k in range(max(1, round(duration / SLICE_S))):
        for name in order if k % 2 == 0 else reversed(order):
            agent, samples = agents[name], lat[name]
            t0 = t = clock()
            end = t0 + SLICE_S
            while t < end:
                agent.set(key, make_value(agent.sets))
                t1 = clock()
                samples.append(t1 - t)
                t = t1
            spent[name] += t - t0
    out = {}
    for name in order:
        samples = sorted(lat[name])
        out[name] = {
            "n": len(samples),
            "sets_per_s": len(samples) / spent[name],
            "p50_ms": percentile(samples, 50) * 1000,
            "p99_ms": percentile(samples, 99) * 1000,
        }
    return out


GUEST_KINDS = (("small", KEY_SMALL, small_value), ("8k", KEY_8K, big_value))


# --------------------------------------------------------------- figures 2-4: the send load --
# The load generator of bench/bridge.py (its keep-alive connections and HTTP parsing), sending
# POST /v1/vms/{vm}/messages instead of GET; it runs in its own process (`sends.py --loadgen`).


class _SendConn(_Conn):
    def send_next(self):
        gen = self.gen
        if gen.stopping or self.lost:
            self.busy = False
            gen.idle_one()
            return
        vm = guest_name(gen.rnd.randrange(gen.vms))
        gen.count += 1
        body = b'{"key":"bench.s%d","value":"v%d"}' % (gen.count % SEND_KEYS, gen.count)
        self.busy = True
        self.t0 = time.perf_counter()
        self.transport.write(
            b"POST /v1/vms/%s/messages HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (vm.encode("ascii"), len(body), body)
        )


class _SendGen(_LoadGen):
    def __init__(self, vms, seed):
        super().__init__(vms, SEND_KEYS, seed)
        self.count = 0
        self.not_delivered = 0

    def record(self, conn, status, body, t1):
        self.done_total += 1
        if status != 200:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        elif orjson.loads(body).get("outcome") != "delivered":
            self.not_delivered += 1
        ws = self.win_start
        if ws is not None and conn.t0 >= ws and (self.win_end is None or t1 <= self.win_end):
            self.done_in_window += 1
            self.lat.append(t1 - conn.t0)


async def _sendgen_main(args):
    gen = _SendGen(args.vms, args.seed)
    res, lat = await drive(gen, lambda: _SendConn(gen), args)
    res["sends_per_s"] = res.pop("rate")
    res["not_delivered"] = gen.not_delivered
    res["lat_us"] = [round(x * 1e6) for x in lat]  # for merging windows (merge_windows)
    print(json.dumps(res), flush=True)


def loadgen_main(argv):
    ap = argparse.ArgumentParser(prog="sends.py --loadgen")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--vms", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    asyncio.run(_sendgen_main(ap.parse_args(argv)))
    return 0


def health(api_socket):
    status, body = http_get(api_socket, "/v1/health", 10.0)
    if status != 200:
        raise BenchError("GET /v1/health answered %d" % status)
    return orjson.loads(body)


def run_sends(real_py, api_socket, concurrency, vms, warmup, duration, seed, pids):
    """One phase of sends from a load generator process; its result, the bridge's commits over
    the window and every process's CPU."""
    args = ["--socket", api_socket, "--concurrency", str(concurrency), "--vms", str(vms)]
    args += ["--warmup", str(warmup), "--duration", str(duration), "--seed", str(seed)]
    res, wall, cpu, (h0, h1) = run_loadgen(
        real_py, __file__, args, pids, probe=lambda: health(api_socket)
    )
    # Over the health readings' interval, which brackets the window: close to it, not exact.
    res["commits"] = h1.get("commits", 0) - h0.get("commits", 0)
    res["commit_units"] = h1.get("commit_units", 0) - h0.get("commit_units", 0)
    res["wall_s"] = wall
    res["cpu_s"] = cpu
    res["cpu_s"]["loadgen"] = res["loadgen_cpu_s"]
    return res


def merge_windows(windows):
    """One figure from several windows of the same phase: rates over their summed time,
    percentiles over all their samples."""
    lat = sorted(x for w in windows for x in w.pop("lat_us"))
    window = sum(w["window_s"] for w in windows)
    wall = sum(w["wall_s"] for w in windows)
    completed = sum(w["completed"] for w in windows)
    commits = sum(w["commits"] for w in windows)
    units = sum(w["commit_units"] for w in windows)
    errors = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "windows": windows,
        "window_s": window,
        "completed": completed,
        "sends_per_s": completed / window,
        "p50_ms": percentile(lat, 50) / 1000 if lat else None,
        "p99_ms": percentile(lat, 99) / 1000 if lat else None,
        "max_ms": lat[-1] / 1000 if lat else None,
        "not_delivered": sum(w["not_delivered"] for w in windows),
        "errors": errors,
        "commits": commits,
        "commit_units": units,
        "sends_per_commit": completed / commits if commits else None,
        "writes_per_commit": units / commits if commits else None,
        "cpu_pct": {
            k: sum(w["cpu_s"][k] for w in windows) * 100.0 / wall for k in windows[0]["cpu_s"]
        },
    }


@contextmanager
def grouping(on):
    """The bridge started inside sees HOSTBRIDGE_GROUP_COMMIT (read once, at its start)."""
    old = os.environ.get(ENVIRONMENT_SWITCH)
    os.environ[ENVIRONMENT_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENVIRONMENT_SWITCH, None)
        else:
            os.environ[ENVIRONMENT_SWITCH] = old


# -------------------------------------------------------------------------------- the report --


def build_summary(res):
    rows = []

    def row(label, value, yard=None, ratio=None, spec="%.0f", what=""):
        rows.append(
            {
                "figure": label,
                "value": value,
                "yardstick": yard,
                "ratio": ratio,
                "spec": spec,
                "yardstick_is": what,
            }
        )

    g = res["guest_rounds"]
    for kind, label in (("small", "small value"), ("8k", "8 KB value")):
        empty = [r[kind]["empty"]["sets_per_s"] for r in g]
        full = [r[kind]["full"]["sets_per_s"] for r in g]
        row(
            "1. guest set, %s, full cache: sets/s" % label,
            med(full),
            med(empty),
            med([_ratio(f, e) for f, e in zip(full, empty)]),
            what="empty cache",
        )
        full_l = [r[kind]["full"]["p50_ms"] for r in g]
        empty_l = [r[kind]["empty"]["p50_ms"] for r in g]
        row(
            "   p50 (ms)",
            med(full_l),
            med(empty_l),
            med([_ratio(f, e) for f, e in zip(full_l, empty_l)]),
            "%.2f",
            "empty cache",
        )
    guest_rate = [r["small"]["empty"]["sets_per_s"] for r in g]
    b = res["bridge_rounds"]

    def fig(mode, c, name):
        return [r[mode][str(c)][name] for r in b]

    def on_off(label, c, name, spec):
        on, off = fig("on", c, name), fig("off", c, name)
        row(label, med(on), med(off), med([_ratio(a, o) for a, o in zip(on, off)]), spec, "off")

    on1 = fig("on", 1, "sends_per_s")
    row(
        "2. bridge send, 1 guest, 1 conn: sends/s",
        med(on1),
        med(guest_rate),
        med([_ratio(a, y) for a, y in zip(on1, guest_rate)]),
        what="1. guest's own sets/s",
    )
    on_off("   sends/s (4. grouping on vs off)", 1, "sends_per_s", "%.0f")
    on_off("   p50 (ms)", 1, "p50_ms", "%.2f")
    on_off("   p99 (ms)", 1, "p99_ms", "%.2f")
    for c in res["concurrencies"]:
        on_off(
            "3. bridge send, %d guests, %d conn: sends/s" % (res["guests"], c),
            c,
            "sends_per_s",
            "%.0f",
        )
        on_off("   p50 (ms)", c, "p50_ms", "%.2f")
        on_off("   p99 (ms)", c, "p99_ms", "%.2f")
        on_off("   sends per commit", c, "sends_per_commit", "%.2f")
        on_off("   writes per commit (sends and acks)", c, "writes_per_commit", "%.2f")
    return rows


def print_summary(rows, out=sys.stdout):
    head = ("figure", "measured", "yardstick", "ratio", "yardstick is")
    table = [head]
    for r in rows:
        yard = "" if r["yardstick"] is None else fmt(r["yardstick"], r["spec"])
        ratio = "" if r["ratio"] is None else "%.2fx" % r["ratio"]
        table.append((r["figure"], fmt(r["value"], r["spec"]), yard, ratio, r["yardstick_is"]))
    print_table(table, out)


def print_guest_round(r, i, order):
    print("guest round %d (%s first):" % (i + 1, order[0]))
    for kind, _, _ in GUEST_KINDS:
        for cache in order:
            x = r[kind][cache]
            print(
                "    %-5s value, %-5s cache: %7.1f sets/s  p50 %7.2f ms  p99 %7.2f ms  (%d sets)"
                % (kind, cache, x["sets_per_s"], x["p50_ms"], x["p99_ms"], x["n"])
            )
    sys.stdout.flush()


def print_bridge_round(r, i):
    print(
        "bridge round %d: synced in %.2f s (grouping on), %.2f s (off)"
        % (i + 1, r["sync"]["on"], r["sync"]["off"])
    )
    for c in [1] + r["order"]:
        first = r["first"][str(c)]
        for mode in (first, "off" if first == "on" else "on"):
            x = r[mode][str(c)]
            cpu = x["cpu_pct"]
            print(
                "    %2d conn, grouping %-3s: %6.0f sends/s  p50 %6.2f ms  p99 %6.2f ms  "
                "max %7.2f ms  %s sends/commit  not delivered %d  errors %s  "
                "CPU%% bridge %.0f, guest_sim %.0f, loadgen %.0f"
                % (
                    c,
                    mode,
                    x["sends_per_s"],
                    x["p50_ms"] or 0,
                    x["p99_ms"] or 0,
                    x["max_ms"] or 0,
                    fmt(x["sends_per_commit"], "%.2f"),
                    x["not_delivered"],
                    x["errors"] or "none",
                    cpu["bridge"],
                    cpu["guest_sim"],
                    cpu["loadgen"],
                )
            )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- the run --


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows (~1.5 minutes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (at least 3; default 3)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    ap.add_argument("--guests", type=int, default=1000, help="simulated guests (default 1000)")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (figures are medians over rounds)")
    if args.guests < 2:
        ap.error("--guests must be at least 2")
    if args.quick:
        args.guest_window, args.warmup, args.seq_window, args.window = 1.0, 0.5, 1.0, 1.5
    else:
        args.guest_window, args.warmup, args.seq_window, args.window = 3.0, 1.0, 3.0, 5.0
    # What bench/bridge.py's Bridge reads: the console script, its default log level.
    args.bridge_opts = SimpleNamespace(bridge_debug=1, bridge_script=None, profile=None)
    return args


def guest_figures(res, args, workdir, real_py):
    agents = {}
    try:
        for name in ("empty", "full"):
            agents[name] = Agent(workdir, real_py, name)
        print(
            "ovmd: %s --daemon (pids %d, %d), state directories in %s"
            % (VENV_OVMD, agents["empty"].peer.pid, agents["full"].peer.pid, workdir)
        )
        agents["empty"].set(KEY_SMALL, small_value(0))
        agents["empty"].set(KEY_8K, big_value(0))
        print("filling the full cache: %d keys of 8,192 bytes..." % FILLERS)
        sys.stdout.flush()
        res["fill_s"] = fill(agents["full"])
        for name, want in (("empty", 2), ("full", GUEST_MAX_KEYS)):
            have = len(agents[name].client.collect("list"))
            if have != want:
                raise BenchError("the %s cache holds %d keys, not %d" % (name, have, want))
        print(
            "    filled in %.1f s; the full cache holds %d keys" % (res["fill_s"], GUEST_MAX_KEYS)
        )
        pids = [a.peer.pid for a in agents.values()]
        for i in range(args.rounds):
            order = ["empty", "full"] if i % 2 == 0 else ["full", "empty"]
            r = {}
            for kind, key, make in GUEST_KINDS:
                r[kind] = guest_sets(agents, order, key, make, args.guest_window)
            res["guest_rounds"].append(r)
            print_guest_round(r, i, order)
            budget(pids)
        res["agent_rss_kib"] = {n: proc_rss_kib(a.peer.pid) for n, a in agents.items()}
    finally:
        for a in agents.values():
            a.stop()


def bridge_figures(res, args, workdir, real_py):
    """Two bridges, grouping on and off, each with its own guest_sim, up at the same time: each
    phase (1, 16, 64 connections) runs against one then the other, the first alternating."""
    sims = {}
    modes = ("on", "off")
    try:
        for mode in modes:
            d = os.path.join(workdir, "sim-" + mode)
            os.mkdir(d)
            sims[mode] = GuestSim(d, real_py, args.guests, 1)
            print(
                "guest_sim for grouping %s (pid %d): %d sockets in %s"
                % (mode, sims[mode].pid, args.guests + 1, sims[mode].dir)
            )
        sys.stdout.flush()
        for i in range(args.rounds):
            r = {
                "order": res["concurrencies"][:: 1 if i % 2 == 0 else -1],
                "sync": {},
                "first": {},
            }
            bridges = {}
            try:
                for mode in modes:
                    tag = "round%d-%s" % (i + 1, mode)
                    rdir = os.path.join(workdir, tag)
                    os.mkdir(rdir)
                    db = os.path.join(rdir, "bridge.sqlite3")
                    cfg = os.path.join(rdir, "bridge.toml")
                    api = os.path.join(rdir, "api.sock")
                    write_config(cfg, db, api, sims[mode])
                    with grouping(mode == "on"):
                        bridges[mode] = Bridge(
                            workdir, tag, cfg, db, api, args.bridge_opts, real_py
                        )
                    sync = wait_synced(bridges[mode], args.guests, 1, 90.0, check_mirror=False)
                    r["sync"][mode] = sync["synced_s"]
                    r[mode] = {}
                for n, c in enumerate([1] + r["order"]):
                    a, b = modes if (i + n) % 2 == 0 else modes[::-1]
                    r["first"][str(c)] = a
                    duration = (args.seq_window if c == 1 else args.window) / 2
                    windows = {a: [], b: []}
                    # A B B A, each window half the phase: a drift of the machine over the
                    # phase (other work, the disk) weighs on both sides alike.
                    for k, mode in enumerate((a, b, b, a)):
                        bridge = bridges[mode]
                        windows[mode].append(
                            run_sends(
                                real_py,
                                bridge.api_socket,
                                c,
                                1 if c == 1 else args.guests,
                                args.warmup,
                                duration,
                                1000 * i + 10 * c + k,
                                {"bridge": bridge.pid, "guest_sim": sims[mode].pid},
                            )
                        )
                    for mode in modes:
                        r[mode][str(c)] = merge_windows(windows[mode])
                    budget([b.pid for b in bridges.values()] + [m.pid for m in sims.values()])
                r["rss_kib"] = {mode: proc_rss_kib(b.pid) for mode, b in bridges.items()}
            finally:
                r["stop_status"] = {mode: b.stop()[0] for mode, b in bridges.items()}
            res["bridge_rounds"].append(r)
            print_bridge_round(r, i)
    finally:
        for sim in sims.values():
            sim.stop()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loadgen"]:
        return loadgen_main(argv[1:])
    args = parse_args(argv)
    real_py = real_interpreter()
    for exe in (VENV_HOSTBRIDGE, VENV_OVMD):
        if not os.path.exists(exe):
            raise SystemExit("sends.py: %s does not exist (run scripts/bootstrap.sh)" % exe)
    # On disk, not tmpfs: figure 1 is the cost of the guest's fsyncs, figures 2-4 the bridge's.
    workdir = tempfile.mkdtemp(prefix="ovmsends-", dir="/var/tmp")
    fs = fs_type(workdir)
    res = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "interpreter": real_py,
        "quick": args.quick,
        "rounds_n": args.rounds,
        "guests": args.guests,
        "workdir_fs": fs,
        "concurrencies": [16, 64],
        "guest_window_s": args.guest_window,
        "window_s": args.window,
        "sequential_window_s": args.seq_window,
        "guest_rounds": [],
        "bridge_rounds": [],
    }
    print("sends benchmark%s" % (" (--quick)" if args.quick else ""))
    print(
        "machine: %d CPUs, load average %.2f %.2f %.2f at start; interpreter %s"
        % ((res["cpus"],) + tuple(res["loadavg_start"]) + (real_py,))
    )
    print("work directory %s (file system: %s)" % (workdir, fs))
    sys.stdout.flush()
    ok = False
    try:
        if fs == "tmpfs":
            raise BenchError("%s is on tmpfs: its fsyncs would cost nothing" % workdir)
        guest_figures(res, args, workdir, real_py)
        bridge_figures(res, args, workdir, real_py)
        ok = True
    except BenchError as e:
        print("sends.py: %s" % e, file=sys.stderr)
    finally:
        res["loadavg_end"] = os.getloadavg()
        res["cpu_s"] = cpu_used_s()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("kept %s" % workdir)
    if not ok:
        return 1
    rows = build_summary(res)
    res["summary"] = rows
    print()
    print(
        "summary (medians of %d rounds; ratio: the median of each round's measured/yardstick; "
        "figures 2-3 measured with group commits on)" % args.rounds
    )
    print_summary(rows)
    print(
        "load average %.2f %.2f %.2f at the end; %.0f s of CPU; the full cache took %.1f s to "
        "fill" % (tuple(res["loadavg_end"]) + (res["cpu_s"], res["fill_s"]))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
