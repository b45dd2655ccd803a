"""Real parts for the bridge's integration tests: the bridge as a process (`python -m
hostbridge.daemon`), a QEMU stand-in for unix channels, a scripted hostile guest, and the bridge
in-process over pty channels. The guest agent as a process is tests.support.agent.Agent.
Everything waits with a deadline; nothing sleeps as an assert.

    with Agent(channel=path) as agent:               # a real ovmd on the pty the bridge made
        agent.wait_ready()
        agent.ovmd("-g", "k")                         # the `ovmd` command against it
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator

from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits, VmSpec
from tests.support.processes import PYTHON, Process
from tests.support.waiting import TIMEOUT, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


class BridgeProc(Process):
    """The bridge daemon as a process, with VMs given as flags and no discovery; its database
    survives restarts."""

    def __init__(self, vms: dict[str, str], db: str | None = None, args=()):
        super().__init__()
        self.vms = vms
        self.db = db or os.path.join(self.dir, "bridge.sqlite3")
        self.api_socket = os.path.join(self.dir, "api.sock")
        self.args = list(args)

    def command(self) -> list[str]:
        cmd = [
            PYTHON,
            "-m",
            "hostbridge.daemon",
            "--no-discover",
            "--db",
            self.db,
            "--api-socket",
            self.api_socket,
            "-d",
            "2",
        ]
        for name, channel in self.vms.items():
            cmd += ["--vm", "%s=%s" % (name, channel)]
        return cmd + self.args

    def wait_ready(self, timeout: float = TIMEOUT) -> BridgeProc:
        def ready() -> bool:
            if not self.running:
                raise AssertionError("bridge exited:\n" + self.log())
            return " ready" in self.log()

        wait_for(ready, timeout, what="the bridge to be ready")
        return self


def cli_argv(bridge: BridgeProc, args, prog="vmmessage"):
    """`prog ARGS` as users run it, against ``bridge``'s API socket: (argv, environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMMESSAGE_")}
    env["VMMESSAGE_BRIDGE"] = bridge.api_socket
    return [os.path.join(os.path.dirname(PYTHON), prog), *args], env


def cli(bridge: BridgeProc, *args, prog="vmmessage", timeout=60):
    """Run `prog ARGS` against ``bridge``; its CompletedProcess (text)."""
    argv, env = cli_argv(bridge, args, prog)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def cli_popen(bridge: BridgeProc, *args, prog="vmmessage"):
    """Start `prog ARGS` against ``bridge`` (a send that waits, while the test acts); its Popen."""
    argv, env = cli_argv(bridge, args, prog)
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def agent_state(bridge: BridgeProc, vm):
    """What the bridge says of ``vm``'s agent (connected, disconnected...), None if it cannot."""
    r = cli(bridge, "status", vm, "--json")
    return json.loads(r.stdout)["agent"] if r.returncode == 0 else None


class _Script(Process):
    """One of the programs beside this file, run by this interpreter; it prints "ready"."""

    script = ""

    def __init__(self, *argv: str):
        super().__init__()
        self.argv = list(argv)

    def command(self) -> list[str]:
        return [PYTHON, os.path.join(HERE, self.script), *self.argv]

    def wait_ready(self, timeout: float = TIMEOUT) -> _Script:
        self.wait_log("ready", timeout)
        return self


class QemuStandIn(_Script):
    """Listens on ``socket`` like QEMU's chardev and relays to a pty linked at ``link``."""

    script = "qemu_standin.py"

    def __init__(self, socket_path: str, link: str):
        super().__init__(socket_path, link)
        self.socket = socket_path
        self.link = link

    def clients(self) -> int:
        try:
            with open(self.socket + ".clients") as f:
                return len(f.read().split())
        except OSError:
            return 0


class Hostile(_Script):
    """``Hostile(channel, mode)``: a misbehaving guest program on a pty channel (see
    hostile_guest.py for the modes)."""

    script = "hostile_guest.py"


def pty_config(directory: str, *names: str, **limits: float) -> Config:
    """A bridge's configuration for VMs ``names`` on pty channels ``directory``/NAME, its database
    there too, no discovery; ``limits`` override Limits' defaults."""
    return Config(
        vms=[VmSpec(n, "pty:" + os.path.join(directory, n), "flag") for n in names],
        db=os.path.join(directory, "bridge.sqlite3"),
        discover=False,
        limits=Limits(**limits),
    )


@contextlib.asynccontextmanager
async def running_bridge(config: Config) -> AsyncIterator[Bridge]:
    """The bridge in-process, started, and stopped on the way out."""
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()
