"""The real host bridge as a process on a QEMU guest's channel socket, with an HTTP client for its
API's unix socket: for the end-to-end tests and bench/real_port.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys

from tests.support import waiting
from tests.support.processes import child_env

BIN = os.path.dirname(sys.executable)
HOSTBRIDGE = os.path.join(BIN, "hostbridge")
VMMESSAGE = os.path.join(BIN, "vmmessage")
VM = "e2e-guest"
TIMEOUT = 60.0  # waits on the emulated guest: generous, the machine is shared


def wait_for(cond, timeout=TIMEOUT, what="condition", interval=0.1):
    return waiting.wait_for(cond, timeout, interval=interval, what=what)


class Bridge:
    """The real host bridge as a process, on QEMU's socket; its database survives restarts."""

    def __init__(self, workdir, agent_socket):
        self.dir = workdir
        self.db = os.path.join(workdir, "bridge.sqlite3")
        self.api = os.path.join(workdir, "api.sock")
        self.log_path = os.path.join(workdir, "bridge.log")
        self.agent_socket = agent_socket
        self.proc = None
        self._log_from = 0

    def start(self):
        # Only this run's lines count: the log is appended to across restarts.
        self._log_from = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    HOSTBRIDGE,
                    "--no-discover",
                    "--vm",
                    "%s=unix:%s" % (VM, self.agent_socket),
                    "--db",
                    self.db,
                    "--api-socket",
                    self.api,
                    "-d",
                    "2",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(drop_prefixes=["VMMESSAGE_"]),
            )
        wait_for(
            lambda: self._alive() and " ready" in self.log()[self._log_from :],
            what="the bridge to be ready",
        )
        return self

    def _alive(self):
        if self.proc.poll() is not None:
            raise AssertionError("bridge exited %s:\n%s" % (self.proc.returncode, self.log()))
        return True

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")  # ASCII logs: offsets are byte offsets

    def kill(self, sig=signal.SIGKILL):
        if self.running():
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def vmmessage(self, *args, timeout=TIMEOUT):
        return subprocess.run(
            [VMMESSAGE, "--bridge", self.api, *args],
            capture_output=True,
            timeout=timeout,
            env=child_env(drop_prefixes=["VMMESSAGE_"]),
        )

    def status(self):
        r = self.vmmessage("--json", "status", VM)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_synced(self, timeout=TIMEOUT):
        return wait_for(
            lambda: self.status()["agent"] == "connected" and self.status(),
            timeout,
            what="the bridge to sync with the guest agent",
            interval=0.2,
        )

    def http(self, method, path, body=None):
        conn = UnixHTTP(self.api)
        try:
            conn.request(
                method,
                path,
                body=json.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)
