"""ovmd + the host bridge against libvirt + the QEMU guest agent, in ONE real guest.

Run by hand, as root, never in CI (see bench/README.md):

    .venv/bin/python bench/vs_libvirt.py [--quick] [--rounds N] [--json OUT] [--keep]

On KVM today the closest thing to ovmd is libvirt with QEMU's guest agent (`virsh
qemu-agent-command`, `libvirt_qemu.qemuAgentCommand`). This script boots one Debian 12 guest
(tests/e2e/systemd_image.py, with the ovmd .deb and Debian's qemu-guest-agent installed) as a
transient TCG domain of a private libvirtd (tests/e2e/libvirt_daemon.py) with both channels:
com.oracle.ovmd (found by a real `hostbridge --discover`, as a user runs it) and
org.qemu.guest_agent.0 (libvirt's own agent connection; udev starts qemu-ga in the guest). Then,
in interleaved rounds (the side that goes first alternates), for both sides:

  1. API round trip p50/p99: GET /v1/vms/{vm}/keys/{key} over the bridge's unix socket (raw
     HTTP/1.1 keep-alive; answered live by the guest, `stale: false` checked) against
     qemuAgentCommand(dom, guest-ping, 5, 0); also against guest-get-time (a reply carrying data)
  2. 16 concurrent clients for a fixed window: ops/s and p99 (each client a thread with its OWN
     connection: 16 keep-alive HTTP connections, 16 libvirt connections)
  3. a 1 KiB acknowledged write: POST /v1/vms/{vm}/messages (200 "delivered": stored by the
     guest's agent) against guest-file-open + guest-file-write + guest-file-flush +
     guest-file-close through libvirt (4 agent commands)
  4. host-only floor: GET /v1/health against dom.isActive()
  5. whole-process CLI wall time: `vmmessage query VM KEY` (the venv's command) against
     `virsh qemu-agent-command VM '{"execute":"guest-ping"}'`, alternating

The clients of both sides run in ONE worker process under Debian's /usr/bin/python3 (the one
python3-libvirt is built for; the project's venv has no libvirt binding), stdlib only for ours.
Figures are medians over the rounds; ratio = ours / libvirt + qemu-ga.

Bounded: --max-seconds (default 1200, 600 with --quick) after the image is ready, then everything
is torn down (domain destroyed, libvirtd and virtlogd stopped if ours, bridge and worker stopped,
the work directory removed unless --keep), also on Ctrl-C, SIGTERM or a failure.
"""

import argparse
import base64
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: python3-libvirt lives there
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
HOSTBRIDGE = os.path.join(VENV_BIN, "hostbridge")
VMMESSAGE = os.path.join(VENV_BIN, "vmmessage")

URI = "qemu:///system"
AGENT_PORT = "com.oracle.ovmd"
QGA_PORT = "org.qemu.guest_agent.0"
SMALL_KEY = "bench.vs-libvirt.small"
SMALL_VALUE = "ovmd-vs-libvirt-"  # 16 bytes
WRITE_KEY = "bench.vs-libvirt.write"
WRITE_SIZE = 1024
QGA_FILE = "/run/ovmd-vs-libvirt.dat"  # tmpfs, as ovmd's own store (/run/ovmd)
AGENT_TIMEOUT = 5  # seconds: libvirt's agent command timeout, the bridge's query/send timeout
BOOT_TIMEOUT = 300.0
GUEST_MEMORY_MIB = 1024

PING = '{"execute":"guest-ping"}'
GET_TIME = '{"execute":"guest-get-time"}'

FULL = {"seq": 600, "write": 60, "floor": 2000, "warm": 1.0, "window": 6.0, "cli": 20}
QUICK = {"seq": 150, "write": 20, "floor": 500, "warm": 0.5, "window": 2.0, "cli": 10}


class BenchError(Exception):
    """A step failed (one line)."""


class Deadline(BaseException):
    """--max-seconds passed (a BaseException: nothing on the way up swallows it)."""


def write_value():
    """The 1 KiB both sides write (ASCII: the same bytes as a JSON string and as a file)."""
    return ("0123456789abcdef" * (WRITE_SIZE // 16))[:WRITE_SIZE]


# -- clients (stdlib only: they also run in the worker under /usr/bin/python3) ------------------


class Http:
    """A minimal HTTP/1.1 keep-alive client over a unix socket (Content-Length bodies only)."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("the bridge closed the connection")
        self.buf += data

    def request(self, method, target, body=None):
        head = "%s %s HTTP/1.1\r\nHost: localhost\r\n" % (method, target)
        if body is not None:
            head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        for line in lines[1:]:
            name, _, val = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(val)
            elif name == b"transfer-encoding":
                raise BenchError("the bridge answered with Transfer-Encoding (not handled)")
        if length is None:
            raise BenchError("an answer without Content-Length")
        while len(self.buf) < length:
            self._fill()
        payload, self.buf = self.buf[:length], self.buf[length:]
        return status, payload


def _error_code(payload):
    try:
        return json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "?"


class Ours:
    """Ops against the bridge's API; each maker opens its own connection."""

    def __init__(self, api, vm, forced=""):
        self.api = api
        self.vm = vm
        self.key_path = "/v1/vms/%s/keys/%s" % (vm, SMALL_KEY)
        self.forced_path = self.key_path + "?" + forced if forced else None
        self.send_path = "/v1/vms/%s/messages" % vm
        self.send_body = json.dumps(
            {"key": WRITE_KEY, "value": write_value(), "log": False, "timeout": AGENT_TIMEOUT}
        ).encode()

    def make(self, what):
        conn = Http(self.api)
        if what == "ours_get":
            target = self.key_path
        elif what == "ours_forced":
            target = self.forced_path
        else:
            target = None

        def get():
            status, payload = conn.request("GET", target)
            if status != 200:
                raise BenchError("GET key: %d %s" % (status, _error_code(payload)))
            kv = json.loads(payload)
            if kv["stale"] is not False or kv["value"] != SMALL_VALUE:
                raise BenchError("GET key: a stale or wrong answer")

        def health():
            status, payload = conn.request("GET", "/v1/health")
            if status != 200 or json.loads(payload)["status"] != "ok":
                raise BenchError("GET /v1/health: %d" % status)

        def send():
            status, payload = conn.request("POST", self.send_path, self.send_body)
            if status != 200:
                raise BenchError("POST send: %d %s" % (status, _error_code(payload)))
            if json.loads(payload)["outcome"] != "delivered":
                raise BenchError("POST send: not delivered")

        op = {"ours_get": get, "ours_forced": get, "ours_health": health, "ours_write": send}
        return op[what], conn.close


class Theirs:
    """Ops through libvirt (python3-libvirt); each maker opens its own libvirt connection."""

    def __init__(self, vm):
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors raise, not print
        self.libvirt = libvirt
        self.vm = vm
        self.b64 = base64.b64encode(write_value().encode()).decode()

    def make(self, what):
        import libvirt_qemu

        conn = self.libvirt.open(URI)
        dom = conn.lookupByName(self.vm)

        def agent(cmd):
            return json.loads(libvirt_qemu.qemuAgentCommand(dom, cmd, AGENT_TIMEOUT, 0))

        def ping():
            if agent(PING) != {"return": {}}:
                raise BenchError("guest-ping: an unexpected answer")

        def get_time():
            if not isinstance(agent(GET_TIME)["return"], int):
                raise BenchError("guest-get-time: an unexpected answer")

        def active():
            if dom.isActive() != 1:
                raise BenchError("isActive: the domain is not active")

        def write():
            open_cmd = {"execute": "guest-file-open", "arguments": {"path": QGA_FILE, "mode": "w"}}
            h = agent(json.dumps(open_cmd))["return"]
            w = agent(
                json.dumps(
                    {"execute": "guest-file-write", "arguments": {"handle": h, "buf-b64": self.b64}}
                )
            )["return"]
            if w["count"] != WRITE_SIZE:
                raise BenchError("guest-file-write wrote %s bytes" % w["count"])
            agent(json.dumps({"execute": "guest-file-flush", "arguments": {"handle": h}}))
            agent(json.dumps({"execute": "guest-file-close", "arguments": {"handle": h}}))

        op = {"lv_ping": ping, "lv_time": get_time, "lv_active": active, "lv_write": write}
        return op[what], conn.close

    def read_back(self):
        """The file's content, read through qemu-ga (checks that the writes landed)."""
        import libvirt_qemu

        conn = self.libvirt.open(URI)
        try:
            dom = conn.lookupByName(self.vm)

            def agent(cmd):
                return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 5, 0))

            h = agent({"execute": "guest-file-open", "arguments": {"path": QGA_FILE, "mode": "r"}})
            h = h["return"]
            r = agent({"execute": "guest-file-read", "arguments": {"handle": h, "count": 4096}})
            agent({"execute": "guest-file-close", "arguments": {"handle": h}})
            return base64.b64decode(r["return"]["buf-b64"]).decode()
        finally:
            conn.close()


def run_sequential(op, n, warmup):
    for _ in range(warmup):
        op()
    times = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        op()
        times.append(clock() - t0)
    return times


def run_concurrent(makers, warmup, window):
    """Each (op, close) in ``makers`` driven by its own thread, back to back, for ``warmup`` then
    ``window`` seconds. Latencies of the requests started and answered inside the window; ops =
    answers completed inside it."""
    clock = time.perf_counter
    start = clock() + 0.2
    t_measure = start + warmup
    t_end = t_measure + window
    samples = [[] for _ in makers]
    errors = []

    def loop(op, out):
        while clock() < start:
            time.sleep(0.002)
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            try:
                op()
            except Exception as e:
                errors.append(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                time.sleep(0.001)
                continue
            out.append((t0, clock()))

    threads = [
        threading.Thread(target=loop, args=(op, out), daemon=True)
        for (op, _), out in zip(makers, samples)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, t_end - clock()) + 60)
    done = [t1 for s in samples for (_, t1) in s if t_measure <= t1 <= t_end]
    lats = [t1 - t0 for s in samples for (t0, t1) in s if t0 >= t_measure and t1 <= t_end]
    return {
        "ops": len(done),
        "window": window,
        "lats": lats,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "stuck": sum(t.is_alive() for t in threads),
    }


def worker_main(args):
    """The client side of both peers: JSON commands on stdin, one JSON answer a line on stdout."""
    ours = Ours(args.api, args.vm, args.forced)
    theirs = Theirs(args.vm)
    seq_ops = {}

    def maker(what):
        return (ours if what.startswith("ours_") else theirs).make(what)

    def handle(req):
        cmd = req["cmd"]
        if cmd == "seq":
            if req["what"] not in seq_ops:
                seq_ops[req["what"]] = maker(req["what"])
            return {"times": run_sequential(seq_ops[req["what"]][0], req["n"], req["warmup"])}
        if cmd == "conc":
            makers = [maker(req["what"]) for _ in range(req["clients"])]
            try:
                return run_concurrent(makers, req["warmup"], req["window"])
            finally:
                for _, close in makers:
                    close()
        if cmd == "wait_qga":
            deadline = time.monotonic() + req["limit"]
            last = ""
            while time.monotonic() < deadline:
                try:
                    op, close = theirs.make("lv_ping")
                    try:
                        op()
                        return {"waited": req["limit"] - (deadline - time.monotonic())}
                    finally:
                        close()
                except Exception as e:
                    last = str(e).splitlines()[0] if str(e) else type(e).__name__
                    time.sleep(0.5)
            raise BenchError("qemu-ga never answered guest-ping: %s" % last)
        if cmd == "check_write":
            op, close = theirs.make("lv_write")
            try:
                op()
            finally:
                close()
            return {"match": theirs.read_back() == write_value()}
        raise BenchError("unknown command %r" % cmd)

    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = dict(handle(req), ok=True)
        except Exception as e:
            reply = {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).splitlines()[:1])}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


# -- orchestration (the venv's interpreter) ---------------------------------------------------


class Worker:
    """The worker process (/usr/bin/python3 running this file with --worker)."""

    def __init__(self, workdir, api, vm, forced):
        self.log_path = os.path.join(workdir, "worker.log")
        argv = [SYSTEM_PYTHON, "-u", os.path.abspath(__file__), "--worker"]
        argv += ["--api", api, "--vm", vm, "--forced", forced]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": "/root"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches us only; we stop it
            )
        self.buf = b""

    def call(self, timeout=120.0, **req):
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("the worker did not answer %s in %.0f s" % (req["cmd"], timeout))
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise BenchError("the worker exited: %s" % self.log_tail())
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise BenchError("worker %s %s: %s" % (req["cmd"], req.get("what", ""), reply["error"]))
        return reply

    def log_tail(self):
        with open(self.log_path, "rb") as f:
            return f.read()[-800:].decode(errors="replace").strip()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


class Bridge:
    """`hostbridge --discover` (libvirt's default channel directories), as
    tests/e2e/test_libvirt_discovery.py runs it, with its database and API socket in workdir."""

    def __init__(self, workdir, env):
        self.api = os.path.join(workdir, "api.sock")
        self.log_path = os.path.join(workdir, "bridge.log")
        argv = [HOSTBRIDGE, "--discover", "--db", os.path.join(workdir, "bridge.sqlite3")]
        argv += ["--api-socket", self.api, "-d", "1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        if self.proc.poll() is not None:
            raise BenchError("the bridge exited %s: %s" % (self.proc.returncode, self.log()[-800:]))
        return True

    def get(self, target):
        conn = Http(self.api, timeout=10)
        try:
            status, payload = conn.request("GET", target)
        finally:
            conn.close()
        return status, json.loads(payload)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def wait_until(cond, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise BenchError("%s: not after %.0f s" % (what, timeout))
        time.sleep(interval)


def pct(values, p):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def cpu_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError, TypeError):
        return None


def libvirtd_pid(lv):
    if lv.libvirtd is not None:
        return lv.libvirtd.pid
    try:
        with open("/run/libvirtd.pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def add_disk(xml, disk):
    """The domain XML of tests/e2e/libvirt_daemon.domain_xml with a root disk and an RNG."""
    anchor = "<memballoon model='none'/>"
    if xml.count(anchor) != 1:
        raise BenchError("domain_xml changed: no single %s to insert the disk before" % anchor)
    devs = (
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        "<source file='%s'/><target dev='vda' bus='virtio'/></disk>\n    "
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\n    " % disk
    )
    return xml.replace(anchor, devs + anchor)


def time_cli(argv, env, expect):
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=60)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or expect not in r.stdout:
        # Never the output itself: it may carry a value.
        err = r.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise BenchError("%s exited %d: %s" % (os.path.basename(argv[0]), r.returncode, err))
    return dt


def guest_journal(ctl):
    """Lines each agent has logged in the guest's journal since boot (counted, never shown)."""
    counts = {}
    for name, match in (("qemu-ga", "_COMM=qemu-ga"), ("ovmd", "_SYSTEMD_UNIT=ovmd.service")):
        r = ctl.run(["journalctl", "-b", "-q", "-o", "cat", match], timeout=60)
        counts[name] = len(r.stdout.splitlines()) if r.rc == 0 else -1
    return counts


def forced_params_in_api():
    """Query parameters of GET /v1/vms/{vm}/keys/{key} besides timeout, per openapi.json."""
    try:
        with open(os.path.join(ROOT, "hostbridge", "openapi.json")) as f:
            doc = json.load(f)
        op = doc["paths"]["/v1/vms/{vm}/keys/{key}"]["get"]
        params = op.get("parameters", [])
    except (OSError, ValueError, KeyError):
        return []
    names = []
    for p in params:
        if "$ref" in p:
            ref = p["$ref"].split("/")[-1]
            p = doc.get("components", {}).get("parameters", {}).get(ref, {})
        if p.get("in") == "query" and p.get("name") not in (None, "timeout"):
            names.append(p["name"])
    return names


def ms(s):
    return s * 1000.0


def run(args):
    from tests.e2e.guest_image import CONTROL_PORT
    from tests.e2e.libvirt_daemon import channel_dir, domain_xml, running_libvirt
    from tests.e2e.qemu import GuestControl
    from tests.e2e.systemd_image import build_systemd_image
    from tests.support.processes import child_env

    cfg = dict(QUICK if args.quick else FULL)
    res = {
        "config": dict(cfg, rounds=args.rounds, clients=args.clients, forced=args.forced),
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "rounds": [],
    }
    print(
        "vs_libvirt: %d CPUs, load average at start %.2f %.2f %.2f; %d rounds%s"
        % (
            (res["cpus"],)
            + tuple(res["loadavg_start"])
            + (args.rounds, ", quick"[: 7 * args.quick])
        )
    )
    t = time.monotonic()
    image = build_systemd_image()
    print(
        "image systemd-image-%s: %s"
        % (image.key, "built in %.0f s" % image.build_seconds if image.build_seconds else "cached")
    )
    res["image_build_seconds"] = round(time.monotonic() - t, 1)

    signal.alarm(int(args.max_seconds))  # from here on, bounded
    vm = "ovmd-vs-libvirt-%s" % os.urandom(3).hex()
    workdir = tempfile.mkdtemp(prefix="vs-libvirt-", dir="/tmp")
    res["workdir"] = workdir
    bridge = worker = ctl = saved = None
    env = child_env(drop_prefixes=["VMMESSAGE_"])
    try:
        disk = os.path.join(workdir, "disk.raw")
        subprocess.run(["cp", "--sparse=always", image.disk, disk], check=True, timeout=300)
        os.chmod(disk, 0o644)
        with running_libvirt(workdir) as lv:  # on the way out: domain destroyed, libvirtd stopped
            try:
                print(
                    "libvirtd %s, answering after %.1f s"
                    % ("started (private)" if lv.libvirtd else "of the machine", lv.start_seconds)
                )
                res["libvirt_version"] = lv.virsh("version").stdout.strip().splitlines()
                control_socket = os.path.join(workdir, "control.sock")
                xml = domain_xml(
                    vm,
                    image.kernel,
                    image.initrd,
                    image.cmdline,
                    channels=[(AGENT_PORT, None), (QGA_PORT, None), (CONTROL_PORT, control_socket)],
                    serial_log=os.path.join(workdir, "serial.log"),
                    memory_mib=GUEST_MEMORY_MIB,
                )
                xml = add_disk(xml, disk)
                bridge = Bridge(workdir, env)
                wait_until(lambda: bridge.alive() and " ready" in bridge.log(), 60, "bridge ready")
                started = time.monotonic()
                dom_id = lv.create(xml)
                print(
                    "virsh create: %.1f s (domain %d, TCG)" % (time.monotonic() - started, dom_id)
                )
                ctl = GuestControl(control_socket, os.path.join(workdir, "serial.log"))
                ctl.wait_ready(BOOT_TIMEOUT)
                boot_s = time.monotonic() - started
                agent_path = "unix:" + os.path.join(channel_dir(dom_id, vm), AGENT_PORT)

                def synced():
                    bridge.alive()
                    status, info = bridge.get("/v1/vms/%s" % vm)
                    ok = status == 200 and info["agent"] == "connected"
                    return info if ok and info["channel"] == agent_path else None

                info = wait_until(synced, BOOT_TIMEOUT, "the bridge to sync with the guest's agent")
                ours_ready = time.monotonic() - started
                worker = Worker(workdir, bridge.api, vm, args.forced)
                worker.call(timeout=BOOT_TIMEOUT + 30, cmd="wait_qga", limit=BOOT_TIMEOUT)
                qga_ready = time.monotonic() - started
                guest = {}
                for name, argv in (
                    ("qemu-ga", ["qemu-ga", "--version"]),
                    ("units", ["systemctl", "is-active", "ovmd", "qemu-guest-agent"]),
                    ("store fs", ["findmnt", "-n", "-o", "FSTYPE", "--target", "/run/ovmd"]),
                ):
                    r = ctl.run(argv, timeout=30)
                    guest[name] = " ".join(r.stdout.decode(errors="replace").split())
                res["guest"] = dict(guest, agent_version=info.get("agent_version"))
                print(
                    "guest up %.1f s after create; ours synced at %.1f s, qemu-ga answering at "
                    "%.1f s; guest: %s, units %s, stores on %s, ovmd %s"
                    % (
                        boot_s,
                        ours_ready,
                        qga_ready,
                        guest["qemu-ga"],
                        guest["units"],
                        guest["store fs"],
                        info.get("agent_version"),
                    )
                )
                # The key ours reads, set through the bridge; the written file checked once.
                conn = Http(bridge.api)
                try:
                    body = json.dumps({"key": SMALL_KEY, "value": SMALL_VALUE, "log": False})
                    status, payload = conn.request(
                        "POST", "/v1/vms/%s/messages" % vm, body.encode()
                    )
                finally:
                    conn.close()
                if status != 200:
                    raise BenchError("setting the key: %d %s" % (status, _error_code(payload)))
                if not worker.call(cmd="check_write")["match"]:
                    raise BenchError("qemu-ga's file did not read back as written")
                extra = forced_params_in_api()
                if extra and not args.forced:
                    print(
                        "note: the API's GET key takes %s: --forced NAME=VALUE measures a forced "
                        "round trip" % ", ".join(extra)
                    )
                pids = {
                    "bridge": bridge.pid,
                    "libvirtd": libvirtd_pid(lv),
                    "qemu": lv.qemu_pid(vm),
                    "worker": worker.proc.pid,
                }
                journal_before = guest_journal(ctl)
                rounds(args, cfg, res, worker, bridge, vm, env, pids)
                res["loadavg_end"] = os.getloadavg()
                res["guest_journal"] = {
                    k: n - journal_before.get(k, 0) for k, n in guest_journal(ctl).items()
                }
            finally:
                # Whatever happened: no more alarms nor Ctrl-C until everything is down. The
                # bridge goes first (it would only retry the channels being torn down).
                saved = shield()
                if ctl is not None:
                    ctl.close()
                for p in (worker, bridge):
                    if p is not None:
                        try:
                            p.stop()
                        except Exception as e:
                            print("cleanup: %s" % e, file=sys.stderr)
    finally:
        saved = shield() if saved is None else saved
        if args.keep:
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    res.setdefault("loadavg_end", os.getloadavg())
    return res


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def shield():
    """No more alarm, and Ctrl-C, SIGTERM and SIGHUP ignored: the cleanup runs to its end (each
    of its steps is bounded). The handlers it replaced, to restore."""
    signal.alarm(0)
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}


def rounds(args, cfg, res, worker, bridge, vm, env, pids):
    n_cli = max(1, math.ceil(cfg["cli"] / args.rounds))
    cli_env = dict(env, VMMESSAGE_BRIDGE=bridge.api)
    vmm = [VMMESSAGE, "query", vm, SMALL_KEY]
    virsh = ["virsh", "-c", URI, "qemu-agent-command", vm, PING]
    for argv, expect in ((vmm, SMALL_VALUE.encode()), (virsh, b'"return"')):
        for _ in range(2):  # warm-up: page cache, .pyc
            time_cli(argv, cli_env, expect)
    hz = os.sysconf("SC_CLK_TCK")

    def seq(what, n, warm):
        return worker.call(cmd="seq", what=what, n=n, warmup=warm)["times"]

    def conc(what):
        before = {k: cpu_ticks(p) for k, p in pids.items() if p}
        t0 = time.monotonic()
        r = worker.call(
            timeout=cfg["warm"] + cfg["window"] + 120,
            cmd="conc",
            what=what,
            clients=args.clients,
            warmup=cfg["warm"],
            window=cfg["window"],
        )
        span = time.monotonic() - t0
        after = {k: cpu_ticks(p) for k, p in pids.items() if p}
        r["cpu"] = {
            k: round(100.0 * (after[k] - t) / hz / span)
            for k, t in before.items()
            if t is not None and after.get(k) is not None
        }
        if r["errors"] or r["stuck"]:
            print(
                "  %s: %d errors (first: %s), %d clients stuck"
                % (what, r["errors"], r["first_error"], r["stuck"])
            )
        return r

    for rnd in range(args.rounds):
        ours_first = rnd % 2 == 0
        t_round = time.monotonic()
        fig = {}

        def pair(name, ours_fn, theirs_fn, ours_first=ours_first, fig=fig):
            if ours_first:
                a = ours_fn()
                b = theirs_fn()
            else:
                b = theirs_fn()
                a = ours_fn()
            fig[name] = {"ours": a, "theirs": b}

        pair(
            "rtt",
            lambda: seq("ours_get", cfg["seq"], 20),
            lambda: {
                "ping": seq("lv_ping", cfg["seq"], 20),
                "time": seq("lv_time", cfg["seq"], 20),
            },
        )
        if args.forced:
            fig["forced"] = {"ours": seq("ours_forced", cfg["seq"], 20)}
        pair(
            "conc",
            lambda: conc("ours_get"),
            lambda: {"ping": conc("lv_ping"), "time": conc("lv_time")},
        )
        pair(
            "write",
            lambda: seq("ours_write", cfg["write"], 3),
            lambda: seq("lv_write", cfg["write"], 3),
        )
        pair(
            "floor",
            lambda: seq("ours_health", cfg["floor"], 50),
            lambda: seq("lv_active", cfg["floor"], 50),
        )

        ours_cli, theirs_cli = [], []
        for i in range(n_cli):
            for side in ("ours", "theirs") if (i + rnd) % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    ours_cli.append(time_cli(vmm, cli_env, SMALL_VALUE.encode()))
                else:
                    theirs_cli.append(time_cli(virsh, cli_env, b'"return"'))
        fig["cli"] = {"ours": ours_cli, "theirs": theirs_cli}
        summary = round_summary(fig)
        res["rounds"].append({"figures": summary, "seconds": round(time.monotonic() - t_round, 1)})
        print(
            "round %d (%s first, %.0f s): rtt %.2f vs %.2f ms, 16 clients %.0f vs %.0f ops/s, "
            "write %.2f vs %.2f ms, floor %.3f vs %.3f ms, CLI %.0f vs %.0f ms"
            % (
                rnd + 1,
                "ours" if ours_first else "libvirt",
                time.monotonic() - t_round,
                summary["rtt_p50"]["ours"],
                summary["rtt_p50"]["theirs"],
                summary["conc_ops"]["ours"],
                summary["conc_ops"]["theirs"],
                summary["write_p50"]["ours"],
                summary["write_p50"]["theirs"],
                summary["floor_p50"]["ours"],
                summary["floor_p50"]["theirs"],
                summary["cli_p50"]["ours"],
                summary["cli_p50"]["theirs"],
            )
        )
        res.setdefault("cli_all", {"ours": [], "theirs": []})
        res["cli_all"]["ours"] += [ms(x) for x in ours_cli]
        res["cli_all"]["theirs"] += [ms(x) for x in theirs_cli]


def round_summary(fig):
    """One round's figures (ms, ops/s, CPU %)."""
    rtt = fig["rtt"]
    conc = {"ours": fig["conc"]["ours"], "theirs": fig["conc"]["theirs"]["ping"]}
    conc_time = fig["conc"]["theirs"]["time"]
    ours_c = conc["ours"]
    out = {
        "rtt_p50": {"ours": ms(pct(rtt["ours"], 50)), "theirs": ms(pct(rtt["theirs"]["ping"], 50))},
        "rtt_p99": {"ours": ms(pct(rtt["ours"], 99)), "theirs": ms(pct(rtt["theirs"]["ping"], 99))},
        "rtt_time_p50": {
            "ours": ms(pct(rtt["ours"], 50)),
            "theirs": ms(pct(rtt["theirs"]["time"], 50)),
        },
        "conc_ops": {s: conc[s]["ops"] / conc[s]["window"] for s in ("ours", "theirs")},
        "conc_p50": {s: ms(pct(conc[s]["lats"], 50)) for s in ("ours", "theirs")},
        "conc_p99": {s: ms(pct(conc[s]["lats"], 99)) for s in ("ours", "theirs")},
        "conc_errors": {
            "ours": ours_c["errors"],
            "theirs": conc["theirs"]["errors"] + conc_time["errors"],
        },
        "conc_time_ops": {
            "ours": ours_c["ops"] / ours_c["window"],
            "theirs": conc_time["ops"] / conc_time["window"],
        },
        "conc_time_p99": {
            "ours": ms(pct(ours_c["lats"], 99)),
            "theirs": ms(pct(conc_time["lats"], 99)),
        },
        "write_p50": {s: ms(pct(fig["write"][s], 50)) for s in ("ours", "theirs")},
        "write_p99": {s: ms(pct(fig["write"][s], 99)) for s in ("ours", "theirs")},
        "floor_p50": {s: ms(pct(fig["floor"][s], 50)) for s in ("ours", "theirs")},
        "cli_p50": {s: ms(statistics.median(fig["cli"][s])) for s in ("ours", "theirs")},
    }
    for who in ("bridge", "libvirtd", "qemu", "worker"):
        out["cpu_" + who] = {s: conc[s]["cpu"].get(who) for s in ("ours", "theirs")}
    if "forced" in fig:
        out["forced_p50"] = {
            "ours": ms(pct(fig["forced"]["ours"], 50)),
            "theirs": ms(pct(rtt["theirs"]["ping"], 50)),
        }
        out["forced_p99"] = {
            "ours": ms(pct(fig["forced"]["ours"], 99)),
            "theirs": ms(pct(rtt["theirs"]["ping"], 99)),
        }
    return out


ROWS = [
    # key, label, unit format
    ("rtt_p50", "API round trip p50 (GET key / guest-ping)", "ms"),
    ("rtt_p99", "API round trip p99 (GET key / guest-ping)", "ms"),
    ("rtt_time_p50", "API round trip p50 (GET key / guest-get-time)", "ms"),
    ("forced_p50", "forced round trip p50 (GET key?FORCED / guest-ping)", "ms"),
    ("forced_p99", "forced round trip p99 (GET key?FORCED / guest-ping)", "ms"),
    ("conc_ops", "16 clients (GET key / guest-ping): ops/s, higher is better", "ops"),
    ("conc_p50", "16 clients: p50", "ms"),
    ("conc_p99", "16 clients: p99", "ms"),
    ("conc_time_ops", "16 clients, theirs guest-get-time: ops/s", "ops"),
    ("conc_time_p99", "16 clients, theirs guest-get-time: p99", "ms"),
    ("write_p50", "1 KiB acknowledged write p50 (send / open+write+flush+close)", "ms"),
    ("write_p99", "1 KiB acknowledged write p99", "ms"),
    ("floor_p50", "host-only floor p50 (GET /v1/health / dom.isActive())", "ms"),
    ("cli_p50", "CLI wall time median (vmmessage query / virsh qemu-agent-command)", "ms"),
    ("conc_errors", "16 clients: errors in the window (sum)", "n"),
    ("cpu_bridge", "16 clients: bridge CPU, % of a core", "pct"),
    ("cpu_libvirtd", "16 clients: libvirtd CPU, % of a core", "pct"),
    ("cpu_qemu", "16 clients: QEMU (the guest) CPU, % of a core", "pct"),
    ("cpu_worker", "16 clients: the client process CPU, % of a core", "pct"),
]


def summarize(res, args):
    rows = []
    for key, label, unit in ROWS:
        per = [r["figures"][key] for r in res["rounds"] if key in r["figures"]]
        if not per:
            continue
        vals = {}
        for side in ("ours", "theirs"):
            xs = [p[side] for p in per if p[side] is not None]
            if not xs:
                vals[side] = None
            elif key == "conc_errors":
                vals[side] = sum(xs)
            elif key == "cli_p50":  # every run of every round
                vals[side] = statistics.median(res["cli_all"][side])
            else:
                vals[side] = statistics.median(xs)
        ratio = None
        if unit in ("ms", "ops") and vals["ours"] and vals["theirs"]:
            ratio = vals["ours"] / vals["theirs"]
        rows.append(
            {
                "key": key,
                "label": label.replace("FORCED", args.forced or "").replace(
                    "16 clients", "%d clients" % args.clients
                ),
                "unit": unit,
                **vals,
                "ratio": ratio,
            }
        )
    return rows


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ms":
        return "%.3f ms" % v if v < 1 else "%.2f ms" % v if v < 100 else "%.0f ms" % v
    if unit == "ops":
        return "%.0f" % v
    if unit == "pct":
        return "%d%%" % v
    return "%d" % v


def print_summary(res, rows):
    print()
    print(
        "%-66s %11s %11s %9s"
        % ("figure (median of %d rounds)" % len(res["rounds"]), "ours", "libvirt+ga", "ours/lv")
    )
    for r in rows:
        print(
            "%-66s %11s %11s %9s"
            % (
                r["label"],
                fmt(r["ours"], r["unit"]),
                fmt(r["theirs"], r["unit"]),
                "%.2fx" % r["ratio"] if r["ratio"] else "",
            )
        )
    g = res.get("guest", {})
    print(
        "\nguest: Debian 12 under TCG, 1 vCPU; %s; ovmd %s; both store on %s. Clients: one "
        "worker process (/usr/bin/python3), one thread per client, each with its OWN connection "
        "(HTTP keep-alive / libvirt.open); libvirt runs one agent command per domain at a time. "
        "libvirt: %s."
        % (
            g.get("qemu-ga"),
            g.get("agent_version"),
            g.get("store fs"),
            "; ".join(res.get("libvirt_version", [])[:2]),
        )
    )
    j = res.get("guest_journal")
    if j:
        print(
            "lines logged in the guest's journal during the rounds: qemu-ga %d (it syslogs each "
            "guest-ping, and each guest-file-open twice and -close once), ovmd %d"
            % (j.get("qemu-ga", -1), j.get("ovmd", -1))
        )
    print(
        "load average at start %.2f %.2f %.2f, at end %.2f %.2f %.2f"
        % (tuple(res["loadavg_start"]) + tuple(res["loadavg_end"]))
    )


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, 2 s windows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    ap.add_argument(
        "--forced",
        default="fresh=true",
        metavar="NAME=VALUE",
        help="the query parameter making GET key a round trip to the guest, measured as a row of "
        "its own (default fresh=true; empty: no such row)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="bound after the image is ready (1200; 600 with --quick)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--api", help=argparse.SUPPRESS)
    ap.add_argument("--vm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker and args.rounds < 3:
        ap.error("--rounds must be at least 3")
    if args.max_seconds is None:
        args.max_seconds = 600 if args.quick else 1200
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, even in a file
    if os.geteuid() != 0:
        print("vs_libvirt: needs root (libvirtd, the image build)", file=sys.stderr)
        return 2
    if not os.path.exists(SYSTEM_PYTHON):
        print("vs_libvirt: %s is missing (python3-libvirt)" % SYSTEM_PYTHON, file=sys.stderr)
        return 2
    if subprocess.run(
        [SYSTEM_PYTHON, "-c", "import libvirt, libvirt_qemu"], capture_output=True
    ).returncode:
        print(
            "vs_libvirt: python3-libvirt is missing (apt-get install python3-libvirt)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, ROOT)

    def on_alarm(_sig, _frame):
        raise Deadline()

    def on_term(_sig, _frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGALRM, on_alarm)
    # Ctrl-C, a kill or a closed terminal: all end in the cleanup (SIGINT even when the shell
    # started us in the background with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        res = run(args)
    except Deadline:
        print(
            "vs_libvirt: stopped after --max-seconds %.0f; cleaned up" % args.max_seconds,
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("vs_libvirt: interrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as e:
        print("vs_libvirt: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    rows = summarize(res, args)
    res["summary"] = rows
    print_summary(res, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print("figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
