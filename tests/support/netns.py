"""A network namespace of the test's own (``ip netns add``), to run the guest agent where the test
decides which interfaces and addresses exist. Deleted on close(), whatever happened.

    with NetNs() as ns:
        ns.ip("link", "add", "ovt0", "type", "dummy")
        agent = NsAgent(ns, channel, args=["--facts", "yes"])

Needs root and iproute2; ``needs_netns`` skips a test without them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

from tests.support.agent import Agent
from tests.support.closing import Closing

_counter = itertools.count(1)


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


needs_netns = pytest.mark.skipif(
    not _can_make_namespaces(), reason="needs root and iproute2 to make a network namespace"
)


class NetNs(Closing):
    def __init__(self) -> None:
        self.name = "ovmdtest-%d-%d" % (os.getpid(), next(_counter))
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        """``ip -n NAME ARGS...``; raises on failure with ip's message."""
        result = subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise AssertionError("ip %s: %s" % (" ".join(args), result.stderr.strip()))
        return result

    def prefix(self) -> list[str]:
        """What runs a command inside the namespace (the same process: ip execs it there)."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        # Deleting the namespace deletes its interfaces; a process still inside keeps it alive
        # until it exits, but the name is gone either way.
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


class NsAgent(Agent):
    """The real agent (tests.support.agent.Agent) running inside ``ns``."""

    def __init__(self, ns: NetNs, channel: str, **kwargs: object) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.ns = ns

    def command(self) -> list[str]:
        return [*self.ns.prefix(), *super().command()]
