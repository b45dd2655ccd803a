"""Boot the end-to-end guest under QEMU (software emulation) and drive it over its control port.

    guest = boot(image, workdir)        # QemuGuest: QEMU running, sockets bound
    try:
        ctl = guest.control()          # GuestControl, connected; waits for the guest to answer
        ctl.call("agent_start")        # or call("agent_kill", {"signal": 15})
        r = ctl.run(["ovmd", "-g", "foo"])   # RunResult(rc, stdout: bytes, stderr: bytes)
    finally:
        guest.kill()                   # by pid, always

The agent's port (com.oracle.ovmd) and the control port are virtserialports whose host sides are
unix sockets that QEMU serves (server=on,wait=off); the bridge connects to ``guest.agent_socket``.
Never KVM: /dev/kvm exists on these machines but QEMU fails with it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.guest_image import AGENT_PORT, CONTROL_PORT

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0  # a loaded 2-core machine runs the emulator several times slower


class GuestError(Exception):
    """The guest did not answer, or answered a control request with an error."""


@dataclass
class RunResult:
    rc: int
    stdout: bytes
    stderr: bytes


class GuestControl:
    """Client of the guest's control program (protocol: guest_image.py's docstring)."""

    def __init__(self, path, serial_log=None):
        self.path = path
        self.serial_log = serial_log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._buf = b""
        self._next_id = 0

    def close(self):
        self.sock.close()

    def _send(self, req):
        self.sock.sendall(json.dumps(req).encode() + b"\n")

    def _recv(self, rid, timeout):
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue  # stale partial line from an earlier boot of the port
                if reply.get("id") == rid:
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(
                    "no answer from the guest's control program in %.0f s%s"
                    % (timeout, self._log_tail())
                )
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise GuestError("QEMU closed the control socket%s" % self._log_tail())
            self._buf += data

    def _log_tail(self):
        if not self.serial_log or not os.path.exists(self.serial_log):
            return ""
        with open(self.serial_log, "rb") as f:
            tail = f.read()[-1500:].decode(errors="replace")
        return "; serial log ends:\n" + tail

    def wait_ready(self, timeout=BOOT_TIMEOUT):
        """Ping until the guest answers (writes wait in QEMU until the guest opens the port)."""
        deadline = time.monotonic() + timeout
        while True:
            self._next_id += 1
            rid = self._next_id
            self._send({"id": rid, "op": "ping"})
            try:
                return self._recv(rid, min(2.0, max(0.1, deadline - time.monotonic())))
            except GuestError:
                if time.monotonic() >= deadline:
                    raise GuestError(
                        "guest not ready after %.0f s%s" % (timeout, self._log_tail())
                    ) from None

    def call(self, op, args=None, timeout=90.0):
        """One request (``args``: its other fields); the reply, or GuestError with the guest's
        one-line error."""
        self._next_id += 1
        rid = self._next_id
        req = dict(args or {}, id=rid, op=op)
        self._send(req)
        reply = self._recv(rid, timeout)
        if not reply.get("ok"):
            raise GuestError("guest %s failed: %s" % (op, reply.get("error")))
        return reply

    def run(self, argv, timeout=60.0, stdin=None):
        """Run argv inside the guest; its exit code and raw output."""
        args = {"argv": list(argv), "timeout": timeout}
        if stdin is not None:
            args["stdin"] = base64.b64encode(stdin).decode()
        r = self.call("run", args, timeout=timeout + 30)
        return RunResult(r["rc"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"]))


class QemuGuest:
    def __init__(self, proc, workdir, agent_socket, control_socket, serial_log, started):
        self.proc = proc
        self.pid = proc.pid
        self.workdir = workdir
        self.agent_socket = agent_socket
        self.control_socket = control_socket
        self.serial_log = serial_log
        self.started = started  # time.monotonic() when QEMU was started
        self._controls = []

    def control(self, timeout=BOOT_TIMEOUT):
        """A connected GuestControl, after the guest answered a ping."""
        ctl = GuestControl(self.control_socket, self.serial_log)
        self._controls.append(ctl)
        ctl.wait_ready(timeout)
        return ctl

    def serial_text(self):
        with open(self.serial_log, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        """Kill QEMU by its pid and reap it; safe to call twice."""
        for ctl in self._controls:
            ctl.close()
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass


def _wait_for_socket(path, proc, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise GuestError("QEMU exited with status %d before listening" % proc.returncode)
        if time.monotonic() > deadline:
            raise GuestError("QEMU did not create %s in %.0f s" % (path, timeout))
        time.sleep(0.02)


def boot(image, workdir, agent=True, memory=512, extra_append=""):
    """Start QEMU on ``image`` with the agent and control ports; return once its sockets exist.

    ``agent=False`` boots with ``ovmd_test.agent=off``: the guest agent starts only when the test
    asks the control program (``call("agent_start")``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    agent_socket = str(workdir / "agent.sock")
    control_socket = str(workdir / "control.sock")
    serial_log = str(workdir / "serial.log")
    for p in (agent_socket, control_socket):
        if os.path.exists(p):
            os.unlink(p)
    append = image.cmdline
    if not agent:
        append += " ovmd_test.agent=off"
    if extra_append:
        append += " " + extra_append
    argv = machine_argv(image, memory, serial_log, append) + ports_argv(
        agent_socket, control_socket
    )
    return launch(
        argv,
        workdir / "qemu.log",
        lambda proc, started: QemuGuest(
            proc, workdir, agent_socket, control_socket, serial_log, started
        ),
    )


def machine_argv(image, memory, serial_log, append):
    """QEMU under software emulation booting ``image``'s kernel and initramfs with ``append``: no
    default devices, no display, the serial console to ``serial_log``; a reboot inside the guest
    ends QEMU (a test boots again explicitly)."""
    return [
        QEMU,
        "-machine",
        "pc,accel=tcg",
        "-m",
        str(memory),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "file:%s" % serial_log,
        "-kernel",
        image.kernel,
        "-initrd",
        image.initrd,
        "-append",
        append,
    ]


def ports_argv(agent_socket, control_socket):
    """The agent's port and the control port on one virtio-serial controller, their host sides
    unix sockets that QEMU serves (server=on,wait=off)."""
    return [
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        "socket,id=ch0,path=%s,server=on,wait=off" % agent_socket,
        "-device",
        "virtserialport,bus=vser0.0,chardev=ch0,name=%s" % AGENT_PORT,
        "-chardev",
        "socket,id=ch1,path=%s,server=on,wait=off" % control_socket,
        "-device",
        "virtserialport,bus=vser0.0,chardev=ch1,name=%s" % CONTROL_PORT,
    ]


def launch(argv, qemu_log, make_guest):
    """Start QEMU with ``argv`` (its output to ``qemu_log``); ``make_guest(proc, started)`` is the
    QemuGuest; return it once both its sockets exist (killed if they never do)."""
    started = time.monotonic()
    with open(qemu_log, "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
    guest = make_guest(proc, started)
    try:
        _wait_for_socket(guest.agent_socket, proc, 30)
        _wait_for_socket(guest.control_socket, proc, 30)
    except BaseException:
        guest.kill()
        raise
    return guest


def ping_round_trips(socket_path, count=200, timeout=30.0):
    """Round-trip times (seconds) of ``count`` pings to the guest agent through QEMU's socket.

    Nothing else may hold the socket (QEMU serves one client at a time): stop the bridge first.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    try:

        def read(wait):
            sock.settimeout(wait)
            try:
                return sock.recv(65536)
            except socket.timeout:
                return None

        return ping_over(sock.sendall, read, count, timeout)
    finally:
        sock.close()


def ping_over(write, read, count=200, timeout=30.0):
    """Round-trip times of ``count`` pings over any byte stream to a guest agent.

    Speaks ovmproto as the bridge does: RESYNC + hello with a fresh nonce (repeated every 3 s until
    answered: the agent may still be opening its port), every frame ignored until the reply that
    echoes the nonce, then one ping at a time. ``read(wait)`` returns bytes, or None after ``wait``
    seconds without any.
    """
    from ovmproto import PROTOCOL_VERSION
    from ovmproto.codec import Reader, encode
    from ovmproto.framing import RESYNC
    from ovmproto.messages import Hello, Ok, Ping

    reader = Reader()

    def until(pred, wait):
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            data = read(left)
            if data == b"":
                raise GuestError("the channel closed")
            for ev in reader.feed(data or b""):
                if pred(ev):
                    return ev

    nonce = os.urandom(8).hex()
    deadline = time.monotonic() + timeout
    hello_id = 0
    while True:
        hello_id += 1
        write(RESYNC + encode(Hello(id=hello_id, v=PROTOCOL_VERSION, nonce=nonce)))
        if until(lambda ev: type(ev) is Ok and ev.nonce == nonce, 3.0) is not None:
            break
        if time.monotonic() > deadline:
            raise GuestError("the agent never answered a hello in %.0f s" % timeout)
    times = []
    for i in range(count):
        rid = 1000 + i
        frame = encode(Ping(id=rid))
        t0 = time.perf_counter()
        write(frame)
        if until(lambda ev, rid=rid: type(ev) is Ok and ev.id == rid, timeout) is None:
            raise GuestError("no answer to ping %d in %.0f s" % (rid, timeout))
        times.append(time.perf_counter() - t0)
    return times
