"""Demo: a host bridge and two guest agents over pty channels, driven with vmmessage and ovmd.

Run through scripts/demo.sh (which installs everything first). Every process is real; every command
shown is run as printed, and its output is shown under it.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
TIMEOUT = 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
# Seconds to keep everything running at the end, so that the Cockpit page can be opened.
HOLD = float(os.environ.get("OVMD_DEMO_HOLD", "0") or 0)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP on the bridge's unix socket (what `curl --unix-socket` does)."""

    def __init__(self, path):
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text):
    print("\n== %s" % text, flush=True)


def show(argv, env=None, expect=0):
    """Run a CLI as a user would and print what they would see."""
    words = [os.path.basename(argv[0])] + [
        a if len(a) <= 60 else "%s...(%d chars)" % (a[:8], len(a)) for a in argv[1:]
    ]
    shown = " ".join(w if " " not in w else repr(w) for w in words)
    out = subprocess.run(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    )
    print("$ %s" % shown, flush=True)
    for line in out.stdout.splitlines():
        print("  " + line, flush=True)
    if out.returncode != expect:
        raise SystemExit("demo: %s exited %d, expected %d" % (shown, out.returncode, expect))
    return out.stdout


def wait_for(what, condition, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("demo: timed out waiting for %s" % what)
        time.sleep(0.05)


class Demo:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ovmd-bridge-demo-")
        self.api = os.path.join(self.dir, "api.sock")
        self.procs = {}
        self.env = dict(os.environ, VMMESSAGE_BRIDGE=self.api)

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def start(self, name, argv):
        log = open(self.path(name + ".log"), "ab")
        self.procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
        )
        log.close()
        print(
            "   started %s (pid %d), log %s"
            % (name, self.procs[name].pid, self.path(name + ".log")),
            flush=True,
        )

    def stop(self, name):
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(TIMEOUT)
        print("   stopped %s (SIGTERM): exit %d" % (name, code), flush=True)
        return code

    def start_agent(self, vm):
        os.makedirs(self.path(vm), exist_ok=True)
        self.start(
            "agent-" + vm,
            [
                os.path.join(BIN, "ovmd"),
                "--daemon",
                "--channel",
                self.path(vm, "com.oracle.ovmd"),
                "--socket",
                self.path(vm, "ovmd.sock"),
                "--state-dir",
                self.path(vm, "state"),
                "--config",
                "/nonexistent",
                "-d",
                "1",
            ],
        )

    def ovmd(self, vm, *args, expect=0):
        return show(
            [os.path.join(BIN, "ovmd"), "--socket", self.path(vm, "ovmd.sock")] + list(args),
            expect=expect,
        )

    def vmmessage(self, *args, expect=0):
        return show([os.path.join(BIN, "vmmessage")] + list(args), env=self.env, expect=expect)

    def agent_state(self, vm):
        out = subprocess.run(
            [os.path.join(BIN, "vmmessage"), "--json", "status", vm],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=30,
        )
        try:
            return json.loads(out.stdout).get("agent")
        except ValueError:
            return None

    def run(self):
        say("start the host bridge with two VMs whose channels are ptys (as QEMU's -chardev pty)")
        for vm in ("web1", "db1"):
            os.makedirs(self.path(vm), exist_ok=True)
        self.start(
            "bridge",
            [
                os.path.join(BIN, "hostbridge"),
                "--vm",
                "web1=pty:" + self.path("web1", "com.oracle.ovmd"),
                "--vm",
                "db1=pty:" + self.path("db1", "com.oracle.ovmd"),
                "--db",
                self.path("bridge.sqlite3"),
                "--api-socket",
                self.api,
                "-d",
                "1",
            ],
        )
        wait_for("the bridge's API socket", lambda: os.path.exists(self.api))
        # `vmmessage watch --json` follows the bridge's change stream for the whole demo; what it
        # printed is shown at the end.
        self.watch_log = open(self.path("watch.jsonl"), "w+")
        self.watcher = subprocess.Popen(
            [os.path.join(BIN, "vmmessage"), "watch", "--json"],
            env=self.env,
            stdout=self.watch_log,
            stderr=subprocess.STDOUT,
        )

        say("start a guest agent in each VM (each opens its VM's end of the channel)")
        for vm in ("web1", "db1"):
            self.start_agent(vm)
        for vm in ("web1", "db1"):
            wait_for(
                "the agent of %s to sync" % vm, lambda vm=vm: self.agent_state(vm) == "connected"
            )
        self.vmmessage("list")

        say("send a message to web1: its agent is connected, so it is delivered and acknowledged")
        self.vmmessage("send", "web1", "com.example.hostname", "web1.example.com")
        self.ovmd("web1", "-l")

        say("stop db1's agent (as during a reboot), then send to it: the bridge queues the message")
        self.stop("agent-db1")
        wait_for(
            "the bridge to see db1's agent gone", lambda: self.agent_state("db1") == "disconnected"
        )
        self.vmmessage("send", "db1", "com.example.role", "database")
        self.vmmessage("send", "db1", "com.example.root-password", "s3cret!", "--no-log")
        self.vmmessage("list")

        say("restart db1's agent: the queued messages are delivered in order, exactly once")
        self.start_agent("db1")
        wait_for("the queue of db1 to drain", lambda: self.agent_state("db1") == "connected")
        wait_for(
            "db1's messages to arrive",
            lambda: (
                subprocess.run(
                    [
                        os.path.join(BIN, "ovmd"),
                        "--socket",
                        self.path("db1", "ovmd.sock"),
                        "-g",
                        "com.example.root-password",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ).returncode
                == 0
            ),
        )
        self.ovmd("db1", "-l", "--json")
        self.vmmessage("audit", "db1")

        say("inside web1, set a key; the host queries it (live from the agent)")
        self.ovmd("web1", "-p", "com.example.app.status=ready")
        self.vmmessage("query", "web1", "com.example.app.status")

        say("the host waits for a key the guest has not set yet (vmmessage wait, ovmd -w's twin)")
        waiter = subprocess.Popen(
            [os.path.join(BIN, "vmmessage"), "wait", "web1", "com.example.app.ready"]
            + ["--timeout", "30"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        print("$ vmmessage wait web1 com.example.app.ready --timeout 30 &", flush=True)
        time.sleep(0.5)  # it is waiting: the guest now sets the key
        self.ovmd("web1", "-p", "com.example.app.ready=yes")
        set_at = time.monotonic()
        out, _ = waiter.communicate(timeout=TIMEOUT)
        for line in out.splitlines():
            print("  " + line, flush=True)
        print(
            "  (the wait returned %.0f ms after `ovmd -p` did, exit %d)"
            % ((time.monotonic() - set_at) * 1000, waiter.returncode),
            flush=True,
        )
        self.vmmessage("wait", "web1", "com.example.app.never", "--timeout", "0.5", expect=1)
        self.vmmessage("sendVmMessage", "Vm", "name=web1", "key=foo", "message=bar", "log=no")

        say("stop web1's agent: a query now answers from the bridge's mirror, marked stale")
        self.stop("agent-web1")
        wait_for(
            "the bridge to see web1's agent gone",
            lambda: self.agent_state("web1") == "disconnected",
        )
        self.vmmessage("query", "web1", "com.example.app.status")

        say("errors are one line with a documented exit code")
        self.vmmessage("query", "web1", "no.such.key", expect=1)
        self.vmmessage("send", "web1", "k" * 257, "v", expect=2)
        self.vmmessage("send", "nosuchvm", "k", "v", expect=1)

        say("list the VMs (STATE is the VM's run state from libvirt: unknown for these pty VMs)")
        self.vmmessage("list")
        self.vmmessage("status", "db1")

        say("Prometheus metrics: GET /metrics on the API socket (an excerpt)")
        self.metrics_excerpt()

        say("the Cockpit page (cockpit-ws on 127.0.0.1, the page served from this checkout)")
        self.cockpit()

        say(
            "what `vmmessage watch --json` printed meanwhile (the bridge's change stream), in short"
        )
        self.watcher.terminate()
        self.watcher.wait(TIMEOUT)
        self.watch_log.seek(0)
        for line in self.watch_log:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            what = " ".join(
                "%s=%s" % (k, ev[k])
                for k in ("agent", "key", "value", "hidden", "origin", "seq", "run_state")
                if k in ev
            )
            print("  %-18s %-5s %s" % (ev["type"], ev.get("vm") or "-", what), flush=True)

    def metrics_excerpt(self):
        conn = UnixHTTPConnection(self.api)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        print("$ curl --unix-socket %s http://localhost/metrics" % self.api, flush=True)
        shown = 0
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if line.startswith("#") or line.endswith(" 0.0"):
                continue  # help, types and the zeros: the excerpt shows what happened
            if name in (
                "hostbridge_build_info",
                "hostbridge_agent_connected",
                "hostbridge_queue_messages",
                "hostbridge_messages_total",
                "hostbridge_message_delivery_seconds_count",
                "hostbridge_message_delivery_seconds_sum",
                "hostbridge_reconnects_total",
            ):
                print("  " + line, flush=True)
                shown += 1
        print("  ... (%d lines in all)" % len(text.splitlines()), flush=True)
        if not shown:
            raise SystemExit("demo: /metrics showed none of the expected series")

    def cockpit(self):
        if not os.access(COCKPIT_WS, os.X_OK):
            print("   cockpit-ws is not installed: apt-get install cockpit-ws cockpit-bridge")
            return
        # The page from this checkout (XDG_DATA_HOME/cockpit/hostbridge), pointed at this demo's
        # bridge by an override of its manifest (docs/cockpit.md), in cockpit-ws's environment.
        data = self.path("cockpit", "data", "cockpit")
        conf = self.path("cockpit", "etc", "cockpit")
        os.makedirs(data)
        os.makedirs(conf)
        os.symlink(os.path.join(ROOT, "cockpit", "hostbridge"), os.path.join(data, "hostbridge"))
        with open(os.path.join(conf, "hostbridge.override.json"), "w") as f:
            json.dump({"config": {"api_socket": self.api}}, f)
        port = free_port()
        env = dict(
            os.environ,
            XDG_DATA_HOME=self.path("cockpit", "data"),
            XDG_CONFIG_DIRS=self.path("cockpit", "etc"),
            XDG_CONFIG_HOME=self.path("cockpit", "home"),
        )
        log = open(self.path("cockpit-ws.log"), "ab")
        self.procs["cockpit-ws"] = subprocess.Popen(
            [COCKPIT_WS, "--local-session=cockpit-bridge", "--no-tls"]
            + ["--address", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        base = "http://127.0.0.1:%d" % port

        def serves_page():
            try:
                url = base + "/cockpit/@localhost/manifests.json"
                with urllib.request.urlopen(url, timeout=5) as r:
                    return "hostbridge" in json.loads(r.read())
            except OSError:
                return False

        wait_for("cockpit-ws to serve the page", serves_page)
        url = base + "/cockpit/@localhost/hostbridge/index.html"
        with urllib.request.urlopen(url, timeout=10) as r:
            served = r.status == 200 and b"VM messages" in r.read()
        print("   cockpit-ws serves the page: %s" % ("yes" if served else "NO"), flush=True)
        print("   open %s (from this machine; e.g. ssh -L %d:127.0.0.1:%d)" % (url, port, port))
        if HOLD:
            print("   keeping everything running for %g s (OVMD_DEMO_HOLD)" % HOLD, flush=True)
            time.sleep(HOLD)
        else:
            print("   (set OVMD_DEMO_HOLD=600 to keep the demo running for 10 minutes to see it)")

    def close(self):
        for name in list(self.procs):
            try:
                self.stop(name)
            except (subprocess.TimeoutExpired, OSError) as e:
                print("   %s did not stop cleanly (%s); killing it" % (name, e), flush=True)
                self.procs.get(name, None) and self.procs[name].kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    demo = Demo()
    try:
        demo.run()
    finally:
        demo.close()
    print("\nDemo finished: every process stopped cleanly.", flush=True)


if __name__ == "__main__":
    main()
