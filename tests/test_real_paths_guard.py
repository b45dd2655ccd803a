"""The guard of tests/support/guard.py: a test that touches the real daemons' paths fails, whether
it does so itself, through product code that swallows the error, or through a child process."""

import os
import subprocess
import sys
import textwrap

import pytest

from guestagent.client import Client, ClientError
from tests.support import guard
from tests.support.guard import RealPathAccess
from tests.support.processes import ROOT, child_env, script


def test_it_should_refuse_to_open_the_real_configuration(real_paths_guard):
    with pytest.raises(RealPathAccess, match=r"open /etc/ovmd\.conf"):
        open("/etc/ovmd.conf")
    assert real_paths_guard.take_problems() == ["this process: open /etc/ovmd.conf"]


def test_it_should_catch_what_product_code_turns_into_its_own_error(real_paths_guard):
    # The client makes any OSError "daemon not reachable": the refusal is still on record.
    with pytest.raises(ClientError), Client("/run/ovmd/ovmd.sock", timeout=5):
        pass
    assert real_paths_guard.take_problems() == ["this process: socket.connect /run/ovmd/ovmd.sock"]


def test_it_should_see_through_var_run_and_relative_paths(real_paths_guard, monkeypatch):
    monkeypatch.chdir("/var")
    with pytest.raises(RealPathAccess):
        os.listdir("run/hostbridge")
    with pytest.raises(RealPathAccess):
        os.mkdir("/var/run/ovmd/x")
    assert real_paths_guard.take_problems() == [
        "this process: os.listdir /run/hostbridge",
        "this process: os.mkdir /run/ovmd/x",
    ]


def test_it_should_leave_other_paths_alone(real_paths_guard, short_dir):
    (short_dir / "run" / "ovmd").mkdir(parents=True)
    (short_dir / "ovmd.conf").write_text("[ovmd]\n")
    assert os.listdir(short_dir / "run") == ["ovmd"]
    assert real_paths_guard.take_problems() == []


def test_a_child_with_default_paths_should_be_caught(real_paths_guard):
    env = child_env(drop_prefixes=["OVMD_SOCKET"])
    r = subprocess.run(
        [script("ovmd"), "-g", "some.key"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode != 0
    problems = real_paths_guard.take_problems()
    assert len(problems) == 1 and problems[0].endswith(": open /etc/ovmd.conf"), problems
    assert problems[0].startswith("pid ") and "ovmd -g some.key" in problems[0]
    r = subprocess.run(
        [script("ovmd"), "--config", "/nonexistent", "-g", "some.key"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 3, r.stderr  # "not reachable": the refusal is an OSError to it
    problems = real_paths_guard.take_problems()
    assert [p.rsplit(": ", 1)[1] for p in problems] == ["socket.connect /run/ovmd/ovmd.sock"]


def test_a_real_path_appearing_should_be_caught_whoever_made_it(monkeypatch, short_dir):
    # Stands in for a program without the hook (a shell, a child given a clean environment).
    made = str(short_dir / "run-ovmd")
    monkeypatch.setattr(guard, "REAL_PATHS", (made,))
    watch = guard.Guard(str(short_dir / "log"))
    (short_dir / "log").write_text("")
    subprocess.run(["mkdir", made], check=True, timeout=30, env={"PATH": os.defpath})
    assert watch.take_problems() == ["%s appeared" % made]
    os.rmdir(made)
    assert watch.take_problems() == ["%s disappeared" % made]
    assert watch.take_problems() == []


def test_the_guard_should_fail_a_test_that_touches_run_ovmd(tmp_path):
    # A pytest session of its own, with this suite's fixtures, over three tests.
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """\
            import subprocess, sys

            def test_writes_the_real_socket_path():
                with open("/run/ovmd/ovmd.sock", "w"):
                    pass

            def test_a_child_swallows_the_refusal():
                code = "try:\\n    open('/run/ovmd/cache.json')\\nexcept OSError:\\n    pass"
                assert subprocess.run([sys.executable, "-c", code]).returncode == 0

            def test_keeps_to_its_own_paths(tmp_path):
                (tmp_path / "ovmd.conf").write_text("")
            """
        )
    )
    env = child_env(pythonpath=[ROOT])
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env=guard.unguarded_env(env),  # its refusals are its own, not this test's
    )
    out = r.stdout
    assert r.returncode == 1, out
    assert out.splitlines()[-1].startswith("1 failed, 2 passed, 2 errors"), out
    assert "ERROR test_sample.py::test_writes_the_real_socket_path" in out, out
    assert "ERROR test_sample.py::test_a_child_swallows_the_refusal" in out, out
    assert "open /run/ovmd/ovmd.sock" in out and "open /run/ovmd/cache.json" in out, out
    assert "the test touched the real daemons' paths" in out, out
