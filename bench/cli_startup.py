"""The command lines users run most, from the checkout's venv and from an installed wheel, in one
run (issue "Fast where it is used most": the checkout's own set-up must not start slower).

    .venv/bin/python bench/cli_startup.py [--runs 30] [--json OUT]

Starts a bridge (python -m hostbridge.daemon, one VM on a pty) and a guest agent on that pty,
sets one key in the guest, builds the project's wheel and installs it into a fresh venv, then
times whole processes in interleaved rounds (each round runs every command once, in an order
that rotates, so that the shared machine's drifts hit all alike):

- `python -I -c pass` by the real interpreter: the floor of any Python command;
- `ovmd -g KEY` through the agent's socket, from the checkout's venv and from the wheel's;
- `vmmessage query VM KEY` through the bridge's API socket (the bridge asks the live agent),
  from the checkout's venv and from the wheel's.

Prints medians and minima (ms) and the ratios checkout/wheel and each against the floor.
Everything runs on this machine's unix sockets and ptys; every process and file is cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
KEY, VALUE = "bench.cli", "a value read by the command line"


def real_interpreter():
    """The interpreter behind the venv, not a shim: the wheel's venv is made with it."""
    return os.path.realpath(sys.executable)


def wait(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("cli_startup: %s did not happen within %gs" % (what, timeout))
        time.sleep(0.1)


def wheel_venv(work):
    """A fresh venv with the project's wheel installed (host extra: vmmessage needs nothing
    more, but an operator installs it so)."""
    out = os.path.join(work, "wheel")
    venv = os.path.join(work, "wheel-venv")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", out, ROOT],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    subprocess.run([real_interpreter(), "-m", "venv", venv], check=True, timeout=300)
    wheel = os.path.join(out, next(n for n in os.listdir(out) if n.endswith(".whl")))
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", wheel],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return os.path.join(venv, "bin")


def one(argv, env, expect):
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    ms = (time.perf_counter() - t0) * 1000
    if done.returncode != 0 or (expect is not None and expect not in done.stdout.decode()):
        raise SystemExit("cli_startup: %s failed: %r" % (" ".join(argv), done.stderr[-300:]))
    return ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="interleaved rounds (default 30)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ovmd-cli-")
    procs = []
    try:
        pty = os.path.join(work, "vm1.pty")
        api = os.path.join(work, "api.sock")
        agent_sock = os.path.join(work, "ovmd.sock")
        py = sys.executable
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OVMD_SOCKET")}
        env["VMMESSAGE_BRIDGE"] = api
        logs = open(os.path.join(work, "daemons.log"), "wb")
        db = os.path.join(work, "db")
        bridge = [py, "-m", "hostbridge.daemon", "--no-discover", "--db", db,
                  "--api-socket", api, "--vm", "vm1=pty:" + pty]  # fmt: skip
        procs.append(subprocess.Popen(bridge, cwd=ROOT, stdout=logs, stderr=logs))
        wait(lambda: os.path.exists(pty) and os.path.exists(api), "the bridge's start")
        procs.append(subprocess.Popen(
            [py, "-m", "guestagent.daemon", "--channel", pty, "--socket", agent_sock,
             "--state-dir", os.path.join(work, "state"), "--config", "/nonexistent", "-d", "1"],
            cwd=ROOT, stdout=logs, stderr=logs))  # fmt: skip
        wait(lambda: os.path.exists(agent_sock), "the agent's start")
        vm = os.path.join(VENV_BIN, "vmmessage")
        ovmd = os.path.join(VENV_BIN, "ovmd")
        one([ovmd, "--socket", agent_sock, "-p", "%s=%s" % (KEY, VALUE)], env, None)

        def connected():
            done = subprocess.run([vm, "status", "vm1", "--json"], env=env, capture_output=True)
            return done.returncode == 0 and json.loads(done.stdout)["agent"] == "connected"

        wait(connected, "the agent's link to the bridge")
        wbin = wheel_venv(work)
        commands = {
            # The floor: the same interpreter in a clean venv (the real interpreter's own site
            # may hold whatever its owner installed).
            "python -c pass (floor)": ([os.path.join(wbin, "python"), "-c", "pass"], None),
            "ovmd -g, checkout": ([ovmd, "--socket", agent_sock, "-g", KEY], VALUE),
            "ovmd -g, wheel": (
                [os.path.join(wbin, "ovmd"), "--socket", agent_sock, "-g", KEY],
                VALUE,
            ),
            "vmmessage query, checkout": ([vm, "query", "vm1", KEY], VALUE),
            "vmmessage query, wheel": (
                [os.path.join(wbin, "vmmessage"), "query", "vm1", KEY],
                VALUE,
            ),
        }
        names = list(commands)
        times = {n: [] for n in names}
        for r in range(3 + args.runs):  # 3 warm-up rounds
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                ms = one(*commands[n][:1], env, commands[n][1])
                if r >= 3:
                    times[n].append(ms)
        result = {
            n: {"median_ms": statistics.median(v), "min_ms": min(v)} for n, v in times.items()
        }
        floor = result[names[0]]["median_ms"]
        nowrite = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
        print("%d interleaved rounds; medians (min) in ms; interpreter %s; "
              "PYTHONDONTWRITEBYTECODE %s" % (args.runs, real_interpreter(), nowrite))  # fmt: skip
        for n in names:
            r = result[n]
            print("  %-28s %7.1f (%5.1f)  %5.2fx the floor" % (
                n, r["median_ms"], r["min_ms"], r["median_ms"] / floor))  # fmt: skip
        for what in ("ovmd -g", "vmmessage query"):
            c, w = result[what + ", checkout"], result[what + ", wheel"]
            ratio = c["median_ms"] / w["median_ms"]
            result[what + " checkout/wheel"] = ratio
            print("  %s: checkout / wheel = %.2fx" % (what, ratio))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
