"""Shell completion of `vmmessage` in a real bash, with the packaged completion file, against a
real bridge process: commands, options, VM names and a VM's keys; nothing, and no error text,
when the bridge is down."""

import os
import subprocess
from contextlib import closing

import pytest

from hostbridge.apiclient import Client
from tests.hostbridge.bridge_harness import BridgeProc
from tests.support.agent import Agent
from tests.support.processes import PYTHON, ROOT
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

COMPLETION = os.path.join(ROOT, "packaging", "completion", "vmmessage")


def complete(line: str, bridge_socket: str) -> list[str]:
    """What bash offers after ``line`` (the words typed so far; a trailing space starts a new
    word), through the packaged completion file, as a user's shell would run it."""
    words = line.split(" ")
    script = (
        'source "$COMPLETION_FILE"\n'
        "COMP_WORDS=(%s)\n"
        "COMP_CWORD=%d\n"
        "_vmmessage_completion vmmessage\n"
        'printf "%%s\\n" "${COMPREPLY[@]}"\n'
    ) % (" ".join("'%s'" % w for w in words), len(words) - 1)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(PYTHON) + ":" + env["PATH"]  # the venv's vmmessage
    env["COMPLETION_FILE"] = COMPLETION
    env["VMMESSAGE_BRIDGE"] = bridge_socket
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.split("\n") if w]


@pytest.fixture
def bridge(short_dir):
    ch = os.path.join(short_dir, "ch")
    b = BridgeProc({"web1": "pty:" + ch, "web2": "pty:" + ch + "2", "db1": "pty:" + ch + "3"})
    with closing(b), closing(Agent(ch)) as agent:
        b.start().wait_ready()
        agent.start().wait_ready()
        api = Client(b.api_socket)
        wait_for(lambda: api.vm("web1")["agent"] == "connected", what="web1's agent")
        for pair in ("com.example.role=web", "com.example.rack=r7", "other=x"):
            assert agent.ovmd("-p", pair).returncode == 0
        wait_for(
            lambda: (
                {"com.example.role", "com.example.rack"}
                <= {e["key"] for e in api.keys("web1")["entries"]}
            ),
            what="web1's keys",
        )
        yield b


def test_it_should_complete_commands_vm_names_and_keys_from_the_bridge(bridge):
    sock = bridge.api_socket
    assert {"send", "query", "wait", "watch", "status"} <= set(complete("vmmessage ", sock))
    assert complete("vmmessage wa", sock) == ["wait", "watch"]
    assert complete("vmmessage query ", sock) == ["db1", "web1", "web2"]
    assert complete("vmmessage status we", sock) == ["web1", "web2"]
    assert sorted(complete("vmmessage query web1 com.example.r", sock)) == [
        "com.example.rack",
        "com.example.role",
    ]
    assert complete("vmmessage rm web2 ", sock) == []  # no agent there: no keys
    assert "--changed" in complete("vmmessage wait web1 k --", sock)


def test_it_should_complete_nothing_and_print_nothing_when_the_bridge_is_down(short_dir):
    missing = os.path.join(str(short_dir), "no-bridge.sock")
    assert complete("vmmessage query ", missing) == []
    assert complete("vmmessage st", missing) == ["status"]  # commands need no bridge
