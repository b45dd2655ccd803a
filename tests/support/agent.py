"""The real guest agent as a process, for the guest's and the bridge's integration tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping

from tests.support.processes import PYTHON, ROOT, Process, accepts, child_env, script
from tests.support.waiting import TIMEOUT, wait_for

OVMD = script("ovmd")


class Agent(Process):
    """``python -m guestagent.daemon`` on ``channel``, every path explicit: its socket and state
    directory in its own directory unless given, no configuration file (never the machine's
    /etc/ovmd.conf or /run/ovmd). Its state survives stop() or kill() and start() again.
    Without the guest facts (``--facts no``): the tests then see only the keys they set; a test of
    the facts passes ``--facts yes`` in ``args``.

    ``args`` follow the paths on the command line (they may override them).
    """

    def __init__(
        self,
        channel: str,
        state_dir: str | None = None,
        socket_path: str | None = None,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        pythonpath: Iterable[str] = (),
    ):
        super().__init__(env=env, pythonpath=pythonpath)
        self.channel = channel
        self.socket = socket_path or os.path.join(self.dir, "ovmd.sock")
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.args = list(args)

    def options(self) -> list[str]:
        """The daemon's options for its paths, and debug level 1."""
        return [
            "--channel",
            self.channel,
            "--socket",
            self.socket,
            "--state-dir",
            self.state_dir,
            "--config",
            "/nonexistent",
            "--facts",
            "no",
            "-d",
            "1",
        ]

    def command(self) -> list[str]:
        return [PYTHON, "-m", "guestagent.daemon", *self.options(), *self.args]

    def wait_ready(self, timeout: float = TIMEOUT) -> Agent:
        """Wait until the local socket accepts connections (the agent listens before it opens the
        channel and before it tells systemd it is ready)."""

        def ready() -> bool:
            if not self.running:
                raise AssertionError(
                    "the agent exited with %s:\n%s" % (self.proc.returncode, self.log())
                )
            return accepts(self.socket)

        wait_for(ready, timeout, what="the agent's socket")
        return self

    def ovmd(self, *args: str) -> subprocess.CompletedProcess:
        """Run the `ovmd` command against this agent (text output)."""
        return subprocess.run(
            [OVMD, "--socket", self.socket, "--config", "/nonexistent", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=child_env(pythonpath=[ROOT]),
            cwd=ROOT,
        )

    def cache_file_bytes(self) -> bytes:
        """Everything in the state directory, concatenated (to look for a value on disk)."""
        out = b""
        for name in os.listdir(self.state_dir):
            with open(os.path.join(self.state_dir, name), "rb") as f:
                out += f.read()
        return out
