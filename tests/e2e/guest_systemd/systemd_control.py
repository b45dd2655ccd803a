"""The control program of the systemd test guest (tests/e2e/systemd_image.py).

Started by ovmd-test-control.service. Speaks the protocol of tests/e2e/guest/control.py (described
in tests/e2e/guest_image.py), installed next to this file and imported for its port handling and
``run``, on the same port. Here systemd owns the agent: ``ping`` reports ovmd.service's MainPID,
the agent_* ops are refused (use ``run`` with systemctl), and ``poweroff`` shuts the guest down
through systemd (the reply goes out first). Runs on the guest's Python 3.11, stdlib only.
"""

import os
import subprocess
import sys
import time

import control  # tests/e2e/guest/control.py, installed in the same directory

PORT_WAIT_LOG_EVERY = 30.0


def agent_pid():
    """ovmd.service's main process, or None while it does not run."""
    try:
        out = subprocess.run(
            ["systemctl", "show", "-p", "MainPID", "--value", "ovmd.service"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return int(out.strip()) or None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def uptime():
    """Seconds since the kernel started (the program's own start says little under systemd)."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def handle(req):
    op = req.get("op")
    if op == "ping":
        return {"agent_pid": agent_pid(), "uptime": uptime()}
    if op == "run":
        return control.run(req["argv"], req.get("timeout", 60), req.get("stdin"))
    if op == "poweroff":
        return {}
    if op in ("agent_start", "agent_kill", "agent_stat"):
        raise RuntimeError("%s: systemd owns ovmd in this guest (run systemctl instead)" % op)
    raise RuntimeError("unknown op %r" % op)


def wait_for_port(path):
    """udev makes the /dev/virtio-ports link during coldplug, which may still run when systemd
    starts this service: wait for it (without a port the guest just idles)."""
    last_log = None
    while not os.path.exists(path):
        if last_log is None or time.monotonic() - last_log > PORT_WAIT_LOG_EVERY:
            control.log("waiting for %s" % path)
            last_log = time.monotonic()
        time.sleep(0.2)


def main():
    wait_for_port(control.CONTROL)
    control.log("serving %s" % control.CONTROL)
    # control.serve looks handle up in its own module: give it this guest's ops.
    control.handle = handle
    control.serve(control.Port(control.CONTROL))
    # serve returns after answering a poweroff.
    subprocess.run(["systemctl", "--no-block", "poweroff"], timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
