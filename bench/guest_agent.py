"""Guest-agent benchmark: our guest daemon (ovmd) side by side with QEMU's guest agent (qemu-ga).

Run by hand, never in CI (see bench/README.md):

    .venv/bin/python bench/guest_agent.py [--quick] [--json OUT.json]

Both agents run as real processes, each on its own raw pty (the stand-in for the virtio-serial
port), and are measured in the same run, interleaved: every round runs each figure for both peers,
and the peer that goes first alternates from round to round; within a round, the sequential round
trips of figures 1 and 2 take turns in blocks of 50 requests (--block). Figures are medians over
the rounds; ratios are ours / qemu-ga. A shared, noisy machine makes absolute times meaningless on
their own.

Figures:
  1. round trip of the cheapest request (ping / guest-ping): p50 and p99
  2. round trip of an 8,192-byte read (get of an 8 KB value / guest-file-read count=8192): p50, p99
  3. 20,000 pipelined pings with 64 and with 256 in flight: replies lost and ops/s
  4. agent RSS after the runs; CPU time and wakeups over an idle period, host connected and absent
  5. `ovmd -g KEY` whole-process wall time against `python -c pass` by the same interpreter
  6. with --syscalls N: each agent's system calls per sequential request (ping, 8 KiB read),
     counted by `strace -c` attached to it for N requests of each kind, with the commonest calls
"""

import argparse
import json
import math
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import termios
import time
import tty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # ovmproto from this tree, whichever interpreter runs the script

import orjson

from ovmproto.codec import Reader, encode
from ovmproto.handshake import Handshake
from ovmproto.messages import Err, Get, Ok, Ping, Set

VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
VENV_OVMD = os.path.join(ROOT, ".venv", "bin", "ovmd")
QEMU_GA = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"

# qemu-ga may run only these; everything else its `-b ?` lists is blocked.
QGA_ALLOWED = (
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-close",
    "guest-file-seek",
)

VALUE_8K = "0123456789abcdef" * 512  # 8,192 bytes of ASCII: no JSON escaping on either side
assert len(VALUE_8K.encode()) == 8192
KEY_8K = "com.example.bench.value8k"
KEY_CLI = "com.example.bench.cli"
VALUE_CLI = "value-for-the-cli"

OURS = "ovmd"
QGA = "qemu-ga"

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_BUDGET_S = 540.0  # the brief allows ~10 minutes of CPU per run; stop well before


class BenchError(Exception):
    """A failure that ends the run with a one-line message (after cleanup)."""


# ---------------------------------------------------------------- interpreter and processes --


def real_interpreter():
    """The real ELF behind the venv's python (a symlink chain, never a shell shim)."""
    real = os.path.realpath(VENV_PY)
    with open(real, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise BenchError(
                "%s resolves to %s, which is not an ELF binary (a shim?)" % (VENV_PY, real)
            )
    return real


def venv_python_argv(real, args):
    """argv and executable that run `real` directly while the venv stays active.

    Python finds its venv from argv[0] (pyvenv.cfg beside it), so exec the real binary by its real
    path with argv[0] naming the venv's python: no shim, no extra exec, the venv's site-packages.
    """
    return [VENV_PY] + list(args), real


def kill_pid(pid, grace=3.0):
    """TERM then KILL one process we started, by pid; reap it if it is our child."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not os.path.exists("/proc/%d" % pid) else 0
        if done == pid:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def alive(proc):
    return proc is not None and proc.poll() is None


def proc_cpu_ticks(pid):
    """utime + stime of the whole process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def proc_ctxt_switches(pid):
    """Voluntary + involuntary context switches summed over every thread of the process."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def check_cpu_budget(peers=()):
    """CPU used so far by the harness, its finished children and the agents still running."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for p in peers:
        if alive(p.proc):
            used += proc_cpu_ticks(p.pid) / float(CLK_TCK)
    if used > CPU_BUDGET_S:
        raise BenchError("CPU budget exceeded (%.0f s of %.0f s); stopping" % (used, CPU_BUDGET_S))
    return used


# ----------------------------------------------------------------------------- the pty link --


def make_raw_pty():
    """A pty pair, both ends raw. TCSANOW: the default TCSAFLUSH would discard pending input."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    tty.setraw(master, termios.TCSANOW)
    return master, slave, os.ttyname(slave)


class AgentGone(BenchError):
    pass


class Link:
    """The host end of one pty: non-blocking I/O with poll, and a reply decoder.

    decode(bytes) returns a list of (request id or None, reply object).
    """

    def __init__(self, master, decode, name):
        self.fd = master
        self.name = name
        os.set_blocking(master, False)
        self.poller = select.poll()
        self.poller.register(master, select.POLLIN)
        self.decode = decode
        self.replies = {}  # id -> reply, for replies that arrived while waiting for another id
        self._next_id = 1
        self.bytes_in = 0

    def next_id(self):
        rid = self._next_id
        self._next_id += 1
        return rid

    def write_all(self, data, timeout=10.0):
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        "%s: could not write to the pty for %.0f s" % (self.name, timeout)
                    ) from None
                self.read_available(0)  # keep the agent's replies flowing while we wait
                select.select([], [self.fd], [], min(left, 0.05))
                continue
            view = view[n:]

    def read_available(self, timeout_ms):
        """Read what is there (waiting up to timeout_ms) and return the decoded replies."""
        if not self.poller.poll(timeout_ms):
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        except OSError as e:  # EIO: the agent closed its end
            raise AgentGone(
                "%s: the agent's end of the pty is closed (%s)" % (self.name, e)
            ) from None
        if not data:
            raise AgentGone("%s: end of file on the pty" % self.name)
        self.bytes_in += len(data)
        return self.decode(data)

    def wait_reply(self, rid, timeout=10.0):
        rep = self.replies.pop(rid, None)
        if rep is not None:
            return rep
        deadline = time.monotonic() + timeout
        while True:
            for got_id, obj in self.read_available(
                max(0, int((deadline - time.monotonic()) * 1000))
            ):
                if got_id == rid:
                    # Anything that came with it is kept for a later wait (rare: sequential use).
                    rep = obj
                elif got_id is not None:
                    self.replies[got_id] = obj
            if rep is not None:
                return rep
            if time.monotonic() >= deadline:
                raise BenchError(
                    "%s: no reply to request %d within %.0f s" % (self.name, rid, timeout)
                )

    def drain(self):
        while self.read_available(0):
            pass
        self.replies.clear()


def ours_decoder():
    reader = Reader()

    def decode(data):
        out = []
        for ev in reader.feed(data):
            t = type(ev)
            if t is Ok or t is Err:
                out.append((ev.id, ev))
            # Changed notifications, Resync events and protocol errors are not replies.
        return out

    return decode, reader


def qga_decoder():
    buf = bytearray()

    def decode(data):
        buf.extend(data)
        nl = buf.rfind(b"\n")
        if nl < 0:
            return []
        lines = bytes(buf[:nl]).replace(b"\xff", b"").split(b"\n")
        del buf[: nl + 1]
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if type(obj) is dict:
                rid = obj.get("id")
                out.append((rid if type(rid) is int else None, obj))
        return out

    return decode


# --------------------------------------------------------------------------------- the peers --


class Peer:
    """One agent process on its own raw pty, and the requests the figures send it."""

    name = ""

    def __init__(self, workdir):
        self.workdir = workdir
        self.master = self.slave = None
        self.pty_path = None
        self.proc = None
        self.link = None
        self.log_path = os.path.join(workdir, "agent.log")
        self._log = None

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])

    def connect(self, timeout=30.0):
        """Synchronize with the agent, retrying: it may not have opened its end yet, or may flush
        input on open (qemu-ga does tcflush)."""
        deadline = time.monotonic() + timeout
        while True:
            if not alive(self.proc):
                raise BenchError(
                    "%s exited with status %s before it answered; its log:\n%s"
                    % (self.name, self.proc.poll(), self.log_tail())
                )
            try:
                if self._sync_once(0.5):
                    break
            except AgentGone:
                time.sleep(0.1)  # the agent has not opened its end yet
            if time.monotonic() > deadline:
                raise BenchError(
                    "%s did not answer the sync within %.0f s; its log:\n%s"
                    % (self.name, timeout, self.log_tail())
                )
        if self.slave is not None:
            # Only the agent keeps the port open now, as in a guest.
            os.close(self.slave)
            self.slave = None

    def close_host(self):
        """Close the host end (the master): the agent's end sees a hangup."""
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def stop(self):
        try:
            if self.proc is not None:
                kill_pid(self.proc.pid)
                self.proc.poll()
        finally:
            for fd in (self.master, self.slave):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.master = self.slave = None
            if self._log is not None:
                self._log.close()
                self._log = None

    # Each peer provides: _sync_once, ping_request(rid), ok(reply), read8k_request(rid),
    # check_read8k(reply), before_read8k() (untimed, may be a no-op).


def script_has_daemon():
    """True when the console script `ovmd` exists and its --help offers --daemon."""
    if not os.path.exists(VENV_OVMD):
        return False
    try:
        done = subprocess.run([VENV_OVMD, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "--daemon" in done.stdout


def install_wheel_venv(workdir, real_py, with_orjson=False):
    """A fresh venv with the project installed from its wheel, as a guest installs it: the
    development venv's editable install adds an import hook (~2 MB of resident memory) that no
    installed agent has. Returns the venv's bin directory."""
    wheels = os.path.join(workdir, "wheel")
    venv = os.path.join(workdir, "wheel-venv")
    python = os.path.join(venv, "bin", "python")
    for cmd in (
        [VENV_PY, "-m", "build", "--wheel", "--outdir", wheels, ROOT],
        [real_py, "-m", "venv", venv],
        None,
    ):
        if cmd is None:
            wheel = os.path.join(wheels, next(n for n in os.listdir(wheels) if n.endswith(".whl")))
            # By default without orjson, as pip installs it and the distribution packages run it;
            # --with-orjson adds the `fast` extra.
            cmd = [python, "-m", "pip", "install", "-q", wheel + ("[fast]" if with_orjson else "")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise BenchError(
                "%s failed: %s (try --ovmd-launcher script)"
                % (" ".join(cmd[:4]), (done.stderr.strip().splitlines() or ["?"])[-1])
            )
    return os.path.join(venv, "bin")


class Ours(Peer):
    name = OURS

    def __init__(self, workdir, real_py, launcher="auto", with_orjson=False):
        super().__init__(workdir)
        self.real_py = real_py
        self.launcher = launcher
        self.with_orjson = with_orjson
        self.state_dir = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "ovmd.sock")
        self.epoch = os.urandom(8).hex()
        self.seq = 0
        self.command = None
        # The agent's venv: its console script (figure 5 runs it) and its python (the baseline).
        self.venv_python = VENV_PY
        self.ovmd_script = VENV_OVMD

    def start(self):
        os.mkdir(self.state_dir, 0o700)
        flags = [
            "--daemon",
            "--channel",
            "PTY",
            "--socket",
            self.socket,
            "--state-dir",
            self.state_dir,
            # The guest facts off: the figures are the agent's requests, and sends.py's full
            # cache must hold exactly the keys it puts there (facts take cache slots).
            "--facts",
            "no",
            "-d",
            "1",
        ]
        if self.launcher == "wheel":
            venv_bin = install_wheel_venv(self.workdir, self.real_py, self.with_orjson)
            self.venv_python = os.path.join(venv_bin, "python")
            self.ovmd_script = os.path.join(venv_bin, "ovmd")
            argv, exe = [self.ovmd_script] + flags, None
        elif self.launcher == "script" or (self.launcher == "auto" and script_has_daemon()):
            # The console script: its shebang is the venv's python (a symlink to the real ELF).
            argv, exe = [VENV_OVMD] + flags, None
        else:
            argv, exe = venv_python_argv(self.real_py, ["-m", "guestagent.daemon"] + flags)
        self._spawn_with_channel(argv, exe)

    def _spawn_with_channel(self, argv, exe):
        self.master, self.slave, self.pty_path = make_raw_pty()
        argv = [self.pty_path if a == "PTY" else a for a in argv]
        self.command = " ".join(argv)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            executable=exe,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        decode, self.reader = ours_decoder()
        self.link = Link(self.master, decode, self.name)

    def _sync_once(self, wait):
        hs = Handshake(request_id=self.link.next_id(), nonce=os.urandom(8).hex(), epoch=self.epoch)
        self.link.write_all(hs.opening())
        deadline = time.monotonic() + wait
        # The handshake needs every message (the reply to a hello is an Ok with a nonce).
        while time.monotonic() < deadline:
            for _, msg in self.link.read_available(50):
                if hs.accept(msg) is not None:
                    self.link.drain()
                    return True
        return False

    def host_set(self, key, value):
        self.seq += 1
        rid = self.link.next_id()
        self.link.write_all(encode(Set(id=rid, seq=self.seq, key=key, value=value)))
        rep = self.link.wait_reply(rid)
        if type(rep) is not Ok:
            raise BenchError("ovmd refused the host set of %s: %s %s" % (key, rep.code, rep.msg))

    def prepare(self):
        self.host_set(KEY_8K, VALUE_8K)
        self.host_set(KEY_CLI, VALUE_CLI)

    def ping_request(self, rid):
        return encode(Ping(id=rid))

    def read8k_request(self, rid):
        return encode(Get(id=rid, key=KEY_8K))

    def before_read8k(self):
        pass

    @staticmethod
    def ok(rep):
        return type(rep) is Ok

    @staticmethod
    def check_read8k(rep):
        if type(rep) is not Ok or rep.value is None or len(rep.value) != 8192:
            raise BenchError("ovmd: get did not return the 8 KB value: %r" % (rep,))


class QemuGa(Peer):
    name = QGA

    def __init__(self, workdir):
        super().__init__(workdir)
        self.state_dir = os.path.join(workdir, "state")
        self.scratch = os.path.join(workdir, "scratch-8k")
        self.handle = None
        self.blocked = None
        self.command = None

    def start(self):
        os.mkdir(self.state_dir, 0o700)
        listed = subprocess.run([QEMU_GA, "-b", "?"], capture_output=True, text=True, timeout=30)
        commands = listed.stdout.split()
        if "guest-ping" not in commands:
            raise BenchError("`qemu-ga -b ?` did not list its commands: %r" % listed.stdout[:200])
        missing = [c for c in QGA_ALLOWED if c not in commands]
        if missing:
            raise BenchError("this qemu-ga lacks %s" % ", ".join(missing))
        self.blocked = [c for c in commands if c not in QGA_ALLOWED]
        with open(self.scratch, "w") as f:
            f.write(VALUE_8K)
        self.master, self.slave, self.pty_path = make_raw_pty()
        argv = [
            QEMU_GA,
            "-m",
            "isa-serial",
            "-p",
            self.pty_path,
            "-t",
            self.state_dir,
            "-f",
            os.path.join(self.workdir, "qemu-ga.pid"),
            "-b",
            ",".join(self.blocked),
        ]
        self.command = " ".join(argv[:-1]) + " <%d commands blocked>" % len(self.blocked)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        self.link = Link(self.master, qga_decoder(), self.name)

    def _sync_once(self, wait):
        # QEMU's own resync: 0xFF drops the agent's partial input; the reply to
        # guest-sync-delimited starts with 0xFF and echoes our fresh id.
        token = int.from_bytes(os.urandom(4), "big")
        self.link.write_all(
            b"\xff"
            + orjson.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}})
            + b"\n"
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for _, obj in self.link.read_available(50):
                if obj.get("return") == token:
                    self.link.drain()
                    return True
        return False

    def call(self, command, arguments=None):
        rid = self.link.next_id()
        req = {"execute": command, "id": rid}
        if arguments is not None:
            req["arguments"] = arguments
        self.link.write_all(orjson.dumps(req) + b"\n")
        rep = self.link.wait_reply(rid)
        if "return" not in rep:
            raise BenchError("qemu-ga %s failed: %s" % (command, rep.get("error")))
        return rep["return"]

    def prepare(self):
        self.handle = self.call("guest-file-open", {"path": self.scratch, "mode": "r"})

    def ping_request(self, rid):
        return b'{"execute":"guest-ping","id":%d}\n' % rid

    def read8k_request(self, rid):
        return b'{"execute":"guest-file-read","arguments":{"handle":%d,"count":8192},"id":%d}\n' % (
            self.handle,
            rid,
        )

    def before_read8k(self):
        self.call("guest-file-seek", {"handle": self.handle, "offset": 0, "whence": "set"})

    @staticmethod
    def ok(rep):
        return "return" in rep

    @staticmethod
    def check_read8k(rep):
        ret = rep.get("return")
        if type(ret) is not dict or ret.get("count") != 8192:
            raise BenchError("qemu-ga: guest-file-read did not return 8192 bytes: %.200r" % (rep,))


# ------------------------------------------------------------------------------- the figures --


def host_decode_costs():
    """What the harness itself spends decoding one reply, per side (a calibration, in µs)."""
    import base64
    import timeit

    ours, _ = ours_decoder()
    qga = qga_decoder()
    ping_o = b'{"t":"ok","id":123456}\n'
    ping_q = b'{"return": {}, "id": 123456}\n'
    big_o = (
        orjson.dumps(
            {"t": "ok", "id": 123456, "key": KEY_8K, "value": VALUE_8K, "ts": 1.5, "origin": "host"}
        )
        + b"\n"
    )
    big_q = (
        orjson.dumps(
            {
                "return": {
                    "count": 8192,
                    "buf-b64": base64.b64encode(VALUE_8K.encode()).decode(),
                    "eof": False,
                },
                "id": 123456,
            }
        )
        + b"\n"
    )

    def cost(fn, data, n):
        return min(timeit.repeat(lambda: fn(data), number=n, repeat=3)) / n * 1e6

    return {
        "ours_ping": cost(ours, ping_o, 20000),
        "qga_ping": cost(qga, ping_q, 20000),
        "ours_8k": cost(ours, big_o, 2000),
        "qga_8k": cost(qga, big_q, 2000),
    }


def idle_interpreter_rss(real_py, code):
    """VmRSS (KiB) of the venv's interpreter sitting idle after running `code` (a yardstick)."""
    argv, exe = venv_python_argv(
        real_py, ["-c", code + "\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"]
    )
    proc = subprocess.Popen(argv, executable=exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError("the yardstick interpreter did not start: %r" % code)
        return proc_rss_kib(proc.pid)
    finally:
        proc.stdin.close()
        proc.stdout.close()
        kill_pid(proc.pid)


def percentile(sorted_samples, p):
    """Nearest-rank percentile of an ascending list."""
    k = max(0, math.ceil(p / 100.0 * len(sorted_samples)) - 1)
    return sorted_samples[k]


def timed_round_trips(peer, make, count, check=None, before=None):
    """count sequential request/reply round trips; each one's time in microseconds."""
    link = peer.link
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        if before is not None:
            before()  # untimed (qemu-ga's re-seek of the scratch file)
        rid = link.next_id()
        req = make(rid)
        t0 = clock()
        link.write_all(req)
        rep = link.wait_reply(rid)
        t1 = clock()
        if check is not None:
            check(rep)
        elif not peer.ok(rep):
            raise BenchError("%s: request failed: %.200r" % (peer.name, rep))
        samples.append((t1 - t0) / 1000.0)
    return samples


def rtt_summary(samples):
    """p50 and p99 (nearest rank) of round-trip times in microseconds."""
    samples = sorted(samples)
    return {"p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99), "n": len(samples)}


def round_trips(peer, make, n, warmup, check=None, before=None):
    """n sequential request/reply round trips (after warmup ones); p50 and p99 in microseconds."""
    timed_round_trips(peer, make, warmup, check, before)
    return rtt_summary(timed_round_trips(peer, make, n, check, before))


def figure_requests(peer, fig):
    """(make, check, before) of figure 1 ("ping") or 2 ("read8k") for this peer."""
    if fig == "ping":
        return peer.ping_request, None, None
    return peer.read8k_request, peer.check_read8k, peer.before_read8k


def interleaved_round_trips(order, fig, n, warmup, block):
    """Figure 1 or 2 for every peer of ``order``: n sequential round trips each (after warmup
    ones), ``block`` requests to one peer, then ``block`` to the next, and so on, so that a slow
    moment of the shared machine (they last from milliseconds to seconds) falls on every peer
    alike. block 0: each peer's n requests in one go, one peer after the other."""
    plans = [(p, figure_requests(p, fig)) for p in order]
    for p, (make, check, before) in plans:
        timed_round_trips(p, make, warmup, check, before)
    samples = {p.name: [] for p in order}
    step = block if block > 0 else n
    for start in range(0, n, step):
        for p, (make, check, before) in plans:
            samples[p.name] += timed_round_trips(p, make, min(step, n - start), check, before)
    return {name: rtt_summary(s) for name, s in samples.items()}


def syscalls_per_request(peer, n):
    """System calls the agent makes per sequential request (ping, then an 8 KiB read), counted
    by `strace -c` attached to its process for n requests of each kind; by call, and in all."""
    if shutil.which("strace") is None:
        raise BenchError("--syscalls needs strace (apt-get install strace)")
    out = {}
    for kind, make, check, before in (
        ("ping", peer.ping_request, None, None),
        ("read8k", peer.read8k_request, peer.check_read8k, peer.before_read8k),
    ):
        summary = os.path.join(peer.workdir, "strace-%s.txt" % kind)
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-o", summary, "-p", str(peer.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # strace says "attached" once it traces: only then do the requests count.
        line = tracer.stderr.readline()
        if b"attached" not in line:
            tracer.kill()
            raise BenchError("strace could not attach to %s: %r" % (peer.name, line))
        round_trips(peer, make, n, 0, check=check, before=before)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        calls = parse_strace_summary(summary)
        total = sum(calls.values())
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
        out[kind] = {
            "per_request": total / n,
            "by_call": {name: count / n for name, count in top},
        }
    return out


def parse_strace_summary(path):
    """{syscall: calls} from `strace -c` output."""
    calls = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            # "% time seconds usecs/call calls [errors] syscall"
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
    return calls


def print_syscalls(result):
    print("system calls per sequential request (strace -c attached to the agent):")
    for name, kinds in result.items():
        for kind, r in kinds.items():
            top = ", ".join("%s %.1f" % kv for kv in r["by_call"].items())
            print("  %-8s %-7s %5.1f   (%s)" % (name, kind, r["per_request"], top))


def pipelined(peer, total, window, deadline_s=90.0, stall_s=1.0):
    """total pings with up to `window` in flight; replies lost and ops/s.

    Both agents answer one channel in order, so a reply to request k means every earlier request
    still unanswered is presumed lost for the window's accounting (it still counts as received if
    it turns up late). If nothing at all arrives for stall_s while requests are in flight, every
    one of them is presumed lost so the run goes on; the overall deadline bounds the whole run.
    ops/s counts received replies over the time from the first request to the last reply, minus
    the stall waits (those measure our timeout, not the agent).
    """
    link = peer.link
    link.drain()
    fd = link.fd
    first = link._next_id
    link._next_id += total
    got = bytearray(total)
    received = errors = 0
    frontier = -1  # highest index answered (or presumed lost)
    sent = 0
    out = bytearray()
    stalls = 0
    stall_time = 0.0
    poller = select.poll()
    make = peer.ping_request
    ok = peer.ok
    t_start = time.perf_counter()
    t_last = t_start
    hard_deadline = t_start + deadline_s
    last_progress = t_start
    deadline_hit = False
    while True:
        in_flight = sent - frontier - 1
        while sent < total and in_flight < window:
            out += make(first + sent)
            sent += 1
            in_flight += 1
        if sent == total and in_flight == 0:
            break
        if out:
            try:
                n = os.write(fd, out)
                del out[:n]
            except BlockingIOError:
                pass
        poller.register(fd, select.POLLIN | (select.POLLOUT if out else 0))
        now = time.perf_counter()
        if now > hard_deadline:
            deadline_hit = True
            break
        wait_ms = max(0, int((min(last_progress + stall_s, hard_deadline) - now) * 1000))
        events = poller.poll(wait_ms)
        replies = ()
        if events and events[0][1] & (select.POLLIN | select.POLLHUP | select.POLLERR):
            replies = link.read_available(0)
        now = time.perf_counter()
        if replies:
            last_progress = now
            for rid, rep in replies:
                k = rid - first if rid is not None else -1
                if 0 <= k < total and not got[k]:
                    got[k] = 1
                    received += 1
                    t_last = now
                    if not ok(rep):
                        errors += 1
                    if k > frontier:
                        frontier = k
        elif not out and now - last_progress >= stall_s and sent - frontier - 1 > 0:
            stalls += 1
            stall_time += now - last_progress
            frontier = sent - 1
            last_progress = now
        elif out and events and events[0][1] & select.POLLOUT:
            last_progress = now  # the agent is draining our requests: not a stall
    # Late replies to presumed-lost requests: one short last look.
    end = time.perf_counter() + (0.2 if received < total else 0)
    while time.perf_counter() < end:
        for rid, _ in link.read_available(50):
            k = rid - first if rid is not None else -1
            if 0 <= k < total and not got[k]:
                got[k] = 1
                received += 1
    active = max(1e-9, (t_last - t_start) - stall_time)
    return {
        "sent": sent,
        "expected": total,
        "received": received,
        "lost": total - received,
        "errors": errors,
        "ops_s": received / active,
        "stalls": stalls,
        "deadline_hit": deadline_hit,
        "window": window,
    }


def idle_period(peers, seconds, phase):
    """CPU and wakeups of each agent over `seconds` of no requests; any bytes it sends are read."""
    before = {}
    for p in peers:
        if alive(p.proc):
            before[p.name] = (proc_cpu_ticks(p.pid), proc_ctxt_switches(p.pid))
    bytes_before = {p.name: p.link.bytes_in for p in peers}
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        open_links = [p for p in peers if p.master is not None]
        if open_links:
            r, _, _ = select.select([p.master for p in open_links], [], [], left)
            for p in open_links:
                if p.master in r:
                    try:
                        p.link.read_available(0)
                    except AgentGone:
                        pass
        else:
            time.sleep(left)
    result = {}
    for p in peers:
        if p.name not in before or not alive(p.proc):
            result[p.name] = {"phase": phase, "alive": False, "exit_status": p.proc.poll()}
            continue
        cpu0, cs0 = before[p.name]
        cpu = (proc_cpu_ticks(p.pid) - cpu0) * 1000.0 / CLK_TCK
        cs = proc_ctxt_switches(p.pid) - cs0
        result[p.name] = {
            "phase": phase,
            "alive": True,
            "seconds": seconds,
            "cpu_ms": cpu,
            "wakeups": cs,
            "wakeups_per_s": cs / seconds,
            "bytes_sent_by_agent": p.link.bytes_in - bytes_before[p.name],
        }
    return result


def interleaved_walls(base, cli, ok, env, runs, name, warmup=3):
    """Whole-process wall times (ms) of ``cli`` against ``base`` (``python -c pass``), run in
    alternating order so drifts in the machine's load hit both alike. Each is (argv, executable);
    ``ok(stdout_text)`` checks every cli run's output. Medians, minima and the median ratio."""

    def one(argv, exe, check):
        t0 = time.perf_counter()
        done = subprocess.run(
            argv,
            executable=exe,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        dt = time.perf_counter() - t0
        if done.returncode != 0 or (check is not None and not check(done.stdout.decode())):
            raise BenchError(
                "%s failed (status %d): %s"
                % (
                    " ".join(argv),
                    done.returncode,
                    done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
                    or done.stdout[:200],
                )
            )
        return dt * 1000.0

    times = {"base": [], "cli": []}
    for i in range(warmup + runs):
        pair = [("base",) + tuple(base) + (None,), ("cli",) + tuple(cli) + (ok,)]
        if i % 2:
            pair.reverse()
        for kind, argv, exe, check in pair:
            ms = one(argv, exe, check)
            if i >= warmup:
                times[kind].append(ms)
    base_ms, cli_ms = times["base"], times["cli"]
    return {
        "runs": runs,
        "python_c_pass_ms": statistics.median(base_ms),
        name + "_ms": statistics.median(cli_ms),
        "ratio": statistics.median(cli_ms) / statistics.median(base_ms),
        "python_c_pass_min_ms": min(base_ms),
        name + "_min_ms": min(cli_ms),
    }


def cli_startup(ours, real_py, runs, warmup=3):
    """Wall time of `ovmd -g KEY` against `python -c pass`, both from the agent's own venv."""
    env = dict(os.environ, OVMD_SOCKET=ours.socket)
    env.pop("PYTHONPATH", None)
    return interleaved_walls(
        ([ours.venv_python, "-c", "pass"], real_py),
        ([ours.ovmd_script, "-g", KEY_CLI], None),
        lambda out: out.strip() == VALUE_CLI,
        env,
        runs,
        "ovmd_g",
        warmup,
    )


# -------------------------------------------------------------------------------- the report --


def med(rounds, peer, fig, field):
    vals = [r[peer][fig][field] for r in rounds if peer in r and fig in r[peer]]
    return statistics.median(vals) if vals else None


def fmt(v, spec="%.0f"):
    return "n/a" if v is None else spec % v


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def build_summary(res):
    rounds = res["rounds"]
    rows = []

    def row(label, ours, qga, rat, goal, met=None, spec="%.0f"):
        rows.append(
            {
                "figure": label,
                "ours": ours,
                "qemu_ga": qga,
                "ratio": rat,
                "goal": goal,
                "met": met,
                "spec": spec,
            }
        )

    for fig, title in (("ping", "1. ping round trip"), ("read8k", "2. 8 KB read round trip")):
        o50, q50 = med(rounds, OURS, fig, "p50_us"), med(rounds, QGA, fig, "p50_us")
        o99, q99 = med(rounds, OURS, fig, "p99_us"), med(rounds, QGA, fig, "p99_us")
        r50 = ratio(o50, q50)
        row(title + " p50 (us)", o50, q50, r50, "<= 0.8x", None if r50 is None else r50 <= 0.8)
        row(title + " p99 (us)", o99, q99, ratio(o99, q99), "-")
    for w in res["windows"]:
        fig = "pipe%d" % w
        ol, ql = med(rounds, OURS, fig, "lost"), med(rounds, QGA, fig, "lost")
        row(
            "3. pipelined w=%d: replies lost (of %d)" % (w, res["pipeline_total"]),
            ol,
            ql,
            None,
            "- (none set)",
        )
        oo, qo = med(rounds, OURS, fig, "ops_s"), med(rounds, QGA, fig, "ops_s")
        row("3. pipelined w=%d: ops/s" % w, oo, qo, ratio(oo, qo), "- (higher is better)")
    rss = res.get("rss_kib", {})
    o_rss = rss.get(OURS)
    q_rss = rss.get(QGA)
    o_mb = None if o_rss is None else o_rss * 1024 / 1e6
    q_mb = None if q_rss is None else q_rss * 1024 / 1e6
    row(
        "4. RSS after the runs (MB = 10^6 B)",
        o_mb,
        q_mb,
        ratio(o_mb, q_mb),
        "ours <= 15 MB",
        None if o_mb is None else o_mb <= 15.0,
        "%.1f",
    )
    for phase in ("connected", "absent"):
        idle = res.get("idle_" + phase, {})
        o, q = idle.get(OURS, {}), idle.get(QGA, {})
        secs = res.get("idle_seconds")
        for field, label in (("cpu_ms", "CPU ms"), ("wakeups", "wakeups")):
            ov = o.get(field) if o.get("alive") else None
            qv = q.get(field) if q.get("alive") else None
            lab = "4. idle %gs, host %s: %s" % (secs or 0, phase, label)
            if o and not o.get("alive"):
                lab += " [ovmd exited]"
            if q and not q.get("alive"):
                lab += " [qemu-ga exited]"
            row(lab, ov, qv, ratio(ov, qv), "-")
    cli = res.get("cli")
    if cli:
        row(
            "5. `ovmd -g` wall (ms) vs `python -c pass`",
            cli["ovmd_g_ms"],
            cli["python_c_pass_ms"],
            cli["ratio"],
            "<= 2.0x",
            cli["ratio"] <= 2.0,
            "%.1f",
        )
    return rows


def print_summary(rows, out=sys.stdout):
    head = ("figure", "ovmd", "qemu-ga*", "ratio", "goal", "met")
    table = [head]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        table.append(
            (
                r["figure"],
                fmt(r["ours"], r["spec"]),
                fmt(r["qemu_ga"], r["spec"]),
                fmt(r["ratio"], "%.2fx"),
                r["goal"],
                met,
            )
        )
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    for n, t in enumerate(table):
        cells = [
            str(c).ljust(widths[i]) if i == 0 or i == 4 else str(c).rjust(widths[i])
            for i, c in enumerate(t)
        ]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(
        "* for figure 5 the qemu-ga column holds `python -c pass` by the same interpreter.",
        file=out,
    )


def print_round(r, i, order):
    parts = []
    for name in order:
        d = r.get(name, {})
        s = []
        if "ping" in d:
            s.append("ping p50 %.0f/p99 %.0f us" % (d["ping"]["p50_us"], d["ping"]["p99_us"]))
        if "read8k" in d:
            s.append("8k p50 %.0f/p99 %.0f us" % (d["read8k"]["p50_us"], d["read8k"]["p99_us"]))
        for k in sorted((x for x in d if x.startswith("pipe")), key=lambda x: int(x[4:])):
            p = d[k]
            s.append(
                "w%d %.0f ops/s lost %d%s"
                % (p["window"], p["ops_s"], p["lost"], " (deadline!)" if p["deadline_hit"] else "")
            )
        parts.append("%s: %s" % (name, "; ".join(s)))
    print("round %d (%s first)" % (i + 1, order[0]))
    for p in parts:
        print("    " + p)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- the run --


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer requests, 3 s idle)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (at least 3; default 3)")
    ap.add_argument(
        "--peers",
        default="%s,%s" % (OURS, QGA),
        help="comma-separated subset of ovmd,qemu-ga (default both)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--block",
        type=int,
        default=50,
        metavar="N",
        help="figures 1 and 2: N requests to one agent, then N to the other, and so on "
        "(default 50); 0: each agent's requests in one go, one agent after the other",
    )
    ap.add_argument(
        "--syscalls",
        type=int,
        default=0,
        metavar="N",
        help="also count each agent's system calls per request over N requests (strace -c)",
    )
    ap.add_argument(
        "--ovmd-launcher",
        choices=("wheel", "auto", "script", "module"),
        default="wheel",
        help="wheel (default): install the project from its wheel into a fresh venv, "
        "as a guest does, and run that `ovmd --daemon`; script: the development "
        "venv's `.venv/bin/ovmd --daemon` (editable install); module: `python -m "
        "guestagent.daemon`; auto: script when its --help offers --daemon, else module",
    )
    ap.add_argument(
        "--with-orjson",
        action="store_true",
        help="with the wheel launcher: install ovmd[fast] (orjson); by default it runs "
        "without, as pip installs it and the .deb and .rpm packages run it",
    )
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (figures are medians over rounds)")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not peers or any(p not in (OURS, QGA) for p in peers):
        ap.error("--peers takes ovmd and/or qemu-ga")
    args.peers = peers
    if args.quick:
        args.rtt_n, args.rtt_warmup, args.pipe_total = 300, 50, 5000
        args.idle_s, args.cli_runs = 3.0, 10
    else:
        args.rtt_n, args.rtt_warmup, args.pipe_total = 2000, 200, 20000
        args.idle_s, args.cli_runs = 10.0, 30
    return args


def main(argv=None):
    args = parse_args(argv)
    real_py = real_interpreter()
    workdir = tempfile.mkdtemp(prefix="ovmbench-")
    peers = []
    res = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "interpreter": real_py,
        "quick": args.quick,
        "rounds": [],
        "windows": [64, 256],
        "pipeline_total": args.pipe_total,
        "rtt_requests": args.rtt_n,
        "idle_seconds": args.idle_s,
        "block": args.block,
    }
    print(
        "guest-agent benchmark: ovmd vs qemu-ga over raw ptys%s"
        % (" (--quick)" if args.quick else "")
    )
    print(
        "machine: %d CPUs, load average %.2f %.2f %.2f at start; interpreter %s (via %s)"
        % ((res["cpus"],) + tuple(res["loadavg_start"]) + (real_py, VENV_PY))
    )
    print(
        "figures 1 and 2: %s"
        % (
            "the agents take turns, %d requests each" % args.block
            if args.block > 0
            else "all of one agent's requests, then the other's (--block 0)"
        )
    )
    sys.stdout.flush()
    try:
        if OURS in args.peers:
            d = os.path.join(workdir, "ovmd")
            os.mkdir(d)
            peers.append(Ours(d, real_py, args.ovmd_launcher, args.with_orjson))
        if QGA in args.peers:
            d = os.path.join(workdir, "qemu-ga")
            os.mkdir(d)
            peers.append(QemuGa(d))
        for p in peers:
            p.start()
        for p in peers:
            p.connect()
            p.prepare()
            print("started %s (pid %d): %s" % (p.name, p.pid, p.command))
        res["rss_kib_start"] = {p.name: proc_rss_kib(p.pid) for p in peers}
        res["host_decode_us"] = host_decode_costs()
        sys.stdout.flush()

        for i in range(args.rounds):
            order = peers if i % 2 == 0 else list(reversed(peers))
            r = {p.name: {} for p in peers}
            for fig in ("ping", "read8k"):
                got = interleaved_round_trips(order, fig, args.rtt_n, args.rtt_warmup, args.block)
                for name, figure in got.items():
                    r[name][fig] = figure
            for w in res["windows"]:
                for p in order:
                    r[p.name]["pipe%d" % w] = pipelined(p, args.pipe_total, w)
                    p.connect()  # lost replies or stray bytes: resynchronize before going on
            res["rounds"].append(r)
            print_round(r, i, [p.name for p in order])
            check_cpu_budget(peers)

        if args.syscalls:
            res["syscalls"] = {}
            for p in peers:
                res["syscalls"][p.name] = syscalls_per_request(p, args.syscalls)
            print_syscalls(res["syscalls"])

        ours = next((p for p in peers if p.name == OURS), None)
        if ours is not None:
            if os.path.exists(VENV_OVMD):
                res["cli"] = cli_startup(ours, real_py, args.cli_runs)
            else:
                print("figure 5 skipped: %s does not exist yet" % VENV_OVMD)

        res["rss_kib"] = {p.name: proc_rss_kib(p.pid) for p in peers if alive(p.proc)}
        res["rss_kib_yardsticks"] = {
            "python -c pass (idle)": idle_interpreter_rss(real_py, "pass"),
            "python + import orjson, ovmproto.codec": idle_interpreter_rss(
                real_py, "import orjson, ovmproto.codec"
            ),
        }
        res["threads"] = {p.name: proc_threads(p.pid) for p in peers if alive(p.proc)}
        for p in peers:
            p.link.drain()
        res["idle_connected"] = idle_period(peers, args.idle_s, "connected")
        for p in peers:
            p.close_host()
        time.sleep(0.5)  # let the hangup be handled; the steady state is what we measure
        res["idle_absent"] = idle_period(peers, args.idle_s, "absent")
        res["loadavg_end"] = os.getloadavg()
        res["agent_cpu_s"] = {
            p.name: proc_cpu_ticks(p.pid) / float(CLK_TCK) for p in peers if alive(p.proc)
        }
        res["cpu_used_s"] = check_cpu_budget(peers)
    except BenchError as e:
        print("benchmark failed: %s" % e, file=sys.stderr)
        return 1
    finally:
        for p in peers:
            try:
                p.stop()
            except Exception as e:  # cleanup must reach every peer; report and go on
                print("cleanup of %s: %s" % (p.name, e), file=sys.stderr)
        if args.keep:
            print("work directory kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = build_summary(res)
    res["summary"] = [{k: v for k, v in r.items() if k != "spec"} for r in rows]
    print()
    print(
        "summary: medians over %d rounds; ratio = ovmd / qemu-ga (lower is better except ops/s)"
        % args.rounds
    )
    print_summary(rows)
    print()
    for phase in ("connected", "absent"):
        for n, d in sorted(res.get("idle_" + phase, {}).items()):
            if d.get("alive"):
                print(
                    "idle, host %s, %s: %.0f ms CPU, %d wakeups (%.1f/s), %d bytes sent"
                    % (
                        phase,
                        n,
                        d["cpu_ms"],
                        d["wakeups"],
                        d["wakeups_per_s"],
                        d["bytes_sent_by_agent"],
                    )
                )
            else:
                print(
                    "idle, host %s, %s: the agent had exited (status %s)"
                    % (phase, n, d.get("exit_status"))
                )
    print(
        "caveat: 'host absent' closes the pty master. On the real virtio-serial port the agent "
        "instead sees POLLHUP with reads returning EOF at once, over and over, and the same "
        "descriptor works again when a host reconnects; a closed pty master hangs the pty up "
        "for good. So this phase shows how each agent reacts to a hangup, not the port's exact "
        "behaviour."
    )
    if "cli" in res:
        c = res["cli"]
        print(
            "figure 5: %d runs each, interleaved; medians ovmd -g %.1f ms, python -c pass %.1f ms "
            "(minima %.1f / %.1f ms)"
            % (
                c["runs"],
                c["ovmd_g_ms"],
                c["python_c_pass_ms"],
                c["ovmd_g_min_ms"],
                c["python_c_pass_min_ms"],
            )
        )
    print(
        "RSS at start (MB): %s; threads after the runs: %s"
        % (
            ", ".join(
                "%s %.1f" % (k, v * 1024 / 1e6) for k, v in sorted(res["rss_kib_start"].items())
            ),
            ", ".join("%s %d" % kv for kv in sorted(res.get("threads", {}).items())),
        )
    )
    print(
        "RSS yardsticks, the same interpreter idle (MB): %s"
        % "; ".join("%s %.1f" % (k, v * 1024 / 1e6) for k, v in res["rss_kib_yardsticks"].items())
    )
    print(
        "host-side decode of one reply (in every round trip above): ovmd ping %.1f us, 8 KB "
        "%.1f us (ovmproto Reader); qemu-ga ping %.1f us, 8 KB %.1f us (orjson)"
        % tuple(res["host_decode_us"][k] for k in ("ours_ping", "ours_8k", "qga_ping", "qga_8k"))
    )
    adjusted = []
    for fig, label, ko, kq in (
        ("ping", "ping", "ours_ping", "qga_ping"),
        ("read8k", "8 KB read", "ours_8k", "qga_8k"),
    ):
        o50 = med(res["rounds"], OURS, fig, "p50_us")
        q50 = med(res["rounds"], QGA, fig, "p50_us")
        if o50 is not None and q50 is not None:
            dec = res["host_decode_us"]
            adjusted.append("%s %.2fx" % (label, (o50 - dec[ko]) / (q50 - dec[kq])))
    if adjusted:
        print(
            "p50 ratios with that host-side decode subtracted on each side (for judging the "
            "agents alone; the table keeps the raw figures): %s" % ", ".join(adjusted)
        )
    print(
        "CPU of the agents: %s"
        % ", ".join("%s %.1f s" % kv for kv in sorted(res.get("agent_cpu_s", {}).items()))
    )
    print(
        "load average %.2f %.2f %.2f at end; CPU used by this run (harness + agents + other "
        "children): %.0f s" % (tuple(res["loadavg_end"]) + (res["cpu_used_s"],))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print("figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
