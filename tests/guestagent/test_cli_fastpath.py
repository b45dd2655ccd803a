"""`ovmd -g KEY` runs in shell loops: its fast path must not import anything heavy.

Checked with the interpreter's own import log (-X importtime) of a real call against the real
daemon, not by timing (the machine is shared). The timing goal itself (within 2x of
`python -c pass`) follows from this: the slow imports are click (~40 ms), orjson (~13 ms with
dataclasses, inspect, uuid), asyncio and the socket module (~8 ms with selectors and enum).
"""

import os
import subprocess
import sys

import pytest

from ovmproto.messages import Clear, Ok, Set
from tests.guestagent.harness import Daemon, Host
from tests.support.agent import OVMD

HEAVY = (
    "click",
    "orjson",
    "json",
    "asyncio",
    "socket",
    "selectors",
    "enum",
    "dataclasses",
    "logging",
    "ovmproto.messages",
    "ovmproto.codec",
)


@pytest.fixture(scope="module")
def daemon():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()
        yield daemon


@pytest.fixture
def socket_path(daemon):
    """The daemon's socket, with exactly foo=bär in the cache."""
    with daemon.client() as client:
        assert type(client.request(Clear)) is Ok
        assert type(client.request(Set, key="foo", value="bär")) is Ok
    return daemon.socket


def imported_modules(args, socket_path):
    """(stdout, exit code, the modules imported by this run of ovmd, in order)."""
    env = dict(os.environ, OVMD_SOCKET=socket_path)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", OVMD] + list(args),
        capture_output=True,
        env=env,
        timeout=60,
    )
    modules = []
    for line in result.stderr.decode("utf-8", "replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.append(name)
    return result.stdout, result.returncode, modules


def modules_after_startup(modules):
    """What the command itself imported (the interpreter's startup ends with `site`)."""
    return modules[modules.index("site") + 1 :] if "site" in modules else modules


@pytest.mark.parametrize(
    "args, out",
    [
        (["-g", "foo"], "bär\n".encode()),
        (["-l"], '{"foo":"bär"}\n'.encode()),
        (["-r", "nothing"], b""),
        (["-p", "a=1", "-p", "b=2"], b""),
        (["-x"], b""),
    ],
)
def test_the_fast_path_should_import_nothing_heavy(socket_path, args, out):
    stdout, code, modules = imported_modules(args, socket_path)
    assert (code, stdout) == (0, out)
    mine = modules_after_startup(modules)
    assert "guestagent.cli" in mine
    assert [m for m in mine if m in HEAVY] == []


def test_the_click_path_should_show_up_in_the_same_log_so_the_check_above_can_fail(socket_path):
    stdout, code, modules = imported_modules(["--get-param", "foo"], socket_path)
    assert (code, stdout) == (0, "bär\n".encode())
    assert "click" in modules_after_startup(modules)
