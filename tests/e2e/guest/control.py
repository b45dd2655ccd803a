"""The test guest's control program: runs commands inside the guest for the host's tests.

Started by /init. Owns the guest agent (``ovmd --daemon``) so that it can start, kill and inspect
it, and serves JSON lines on the virtio-serial port org.ovmd.test.control; the protocol is
described in tests/e2e/guest_image.py. Runs on the guest's Python 3.11, stdlib only.

The port reads EOF at once, over and over, while no host is connected: wait for the next
connection with edge-triggered epoll (woken only by connect, disconnect and data), never spin.
"""

import base64
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

CONTROL = "/dev/virtio-ports/org.ovmd.test.control"
AGENT_SOCKET = "/run/ovmd/ovmd.sock"
AGENT_LOG = "/dev/console"

started = time.monotonic()
agent = None  # subprocess.Popen of ovmd --daemon


def log(msg):
    sys.stderr.write("control: %s\n" % msg)
    sys.stderr.flush()


def agent_pid():
    return agent.pid if agent is not None and agent.poll() is None else None


def agent_start(args=()):
    global agent
    if agent_pid() is not None:
        raise RuntimeError("agent already running (pid %d)" % agent.pid)
    with open(AGENT_LOG, "wb", buffering=0) as out:
        agent = subprocess.Popen(
            ["ovmd", "--daemon", "-d", "1"] + list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError("agent exited with status %d while starting" % agent.returncode)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(AGENT_SOCKET)
            return agent.pid
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise RuntimeError("agent socket %s not ready after 60 s" % AGENT_SOCKET)


def agent_kill(sig=signal.SIGKILL):
    if agent_pid() is None:
        raise RuntimeError("agent not running")
    agent.send_signal(sig)
    return agent.pid, agent.wait(30)


def agent_stat():
    pid = agent_pid()
    if pid is None:
        raise RuntimeError("agent not running")
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ctxt = [0, 0]
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                ctxt[0] = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                ctxt[1] = int(line.split()[1])
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return {
        "pid": pid,
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "clk_tck": os.sysconf("SC_CLK_TCK"),
        "ctxt": ctxt,
    }


def run(argv, timeout=60, stdin=None):
    proc = subprocess.run(
        argv,
        input=base64.b64decode(stdin) if stdin else b"",
        capture_output=True,
        timeout=timeout,
    )
    return {
        "rc": proc.returncode,
        "stdout": base64.b64encode(proc.stdout).decode(),
        "stderr": base64.b64encode(proc.stderr).decode(),
    }


def handle(req):
    op = req.get("op")
    if op == "ping":
        return {"agent_pid": agent_pid(), "uptime": time.monotonic() - started}
    if op == "run":
        return run(req["argv"], req.get("timeout", 60), req.get("stdin"))
    if op == "agent_start":
        return {"pid": agent_start(req.get("args", ()))}
    if op == "agent_kill":
        pid, status = agent_kill(req.get("signal", signal.SIGKILL))
        return {"pid": pid, "status": status}
    if op == "agent_stat":
        return agent_stat()
    if op == "poweroff":
        return {}
    raise RuntimeError("unknown op %r" % op)


class Port:
    """The control port; reads and writes wait (without spinning) while no host is there."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.ep = select.epoll()
        self.ep.register(self.fd, select.EPOLLIN | select.EPOLLHUP | select.EPOLLET)

    def read(self):
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                data = None
            if data:
                return data
            # EOF (no host) or nothing yet: sleep until the port's state changes. Edge-triggered,
            # so a HUP that persists wakes us once, not continuously; the timeout is a safety net.
            self.ep.poll(5.0)

    def write(self, data):
        while data:
            try:
                n = os.write(self.fd, data)
                data = data[n:]
            except BlockingIOError:
                # Host absent or slow: wait for the state to change, then try again.
                self.ep.poll(1.0)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise


def serve(port):
    buf = b""
    while True:
        buf += port.read()
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                rid = req.get("id")
            except ValueError:
                log("bad request line (%d bytes)" % len(line))
                continue
            try:
                reply = {"id": rid, "ok": True}
                reply.update(handle(req))
            except Exception as e:  # noqa: BLE001 - every failure goes back to the host as one line
                reply = {"id": rid, "ok": False, "error": "%s: %s" % (type(e).__name__, e)}
            port.write(json.dumps(reply).encode() + b"\n")
            if req.get("op") == "poweroff":
                return


def autostart():
    try:
        with open("/proc/cmdline") as f:
            return "ovmd_test.agent=off" not in f.read().split()
    except OSError:
        return True


def wait_for_control(timeout=15.0):
    """Link the ports that appear after /init stopped waiting, until the control port is there.
    /init waits for the first port only, and the kernel adds each port on its own message from
    QEMU: on a loaded host the agent's port came up alone and the control port a moment later,
    and the guest idled without it (the host's test then timed out). A guest booted without a
    control port pays this wait once, with its agent already running."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(CONTROL) and time.monotonic() < deadline:
        try:
            ports = os.listdir("/sys/class/virtio-ports")
        except OSError:
            ports = []
        for port in ports:
            try:
                with open("/sys/class/virtio-ports/%s/name" % port) as f:
                    name = f.read().strip()
                if name and not os.path.exists("/dev/virtio-ports/" + name):
                    os.symlink("/dev/" + port, "/dev/virtio-ports/" + name)
            except OSError:
                pass  # no name or device node yet: the next round
        time.sleep(0.1)


def main():
    if autostart():
        try:
            log("agent started, pid %d" % agent_start())
        except RuntimeError as e:
            log(str(e))
    wait_for_control()
    if not os.path.exists(CONTROL):
        # A guest booted without the control port (e.g. by libvirt): just keep the agent running.
        log("no %s; idle" % CONTROL)
        while True:
            signal.pause()
    log("serving %s" % CONTROL)
    serve(Port(CONTROL))
    if agent_pid() is not None:
        agent_kill(signal.SIGTERM)


if __name__ == "__main__":
    main()
