"""Helpers shared by the whole test suite, one small module each:

    waiting     wait_for / async_wait_for: poll with a deadline, HarnessTimeout when it passes
    tempdirs    short_tempdir(): directories short enough for unix socket paths
    closing     Closing: ``with`` for objects that have close()
    processes   child environments (child_env), Process: a program under test with its log
    agent       Agent: the real guest agent as a process, always on explicit paths
    ptys        open_raw_pty(), point_link(): channels as the agent sees them
    guard       no test touches the real daemons' paths (the autouse fixture in tests/conftest.py)

How they are imported: ``from tests.support.waiting import wait_for``. pytest runs with
``--import-mode=importlib`` (pyproject.toml), which puts no test directory on sys.path: test files
in different folders may share a basename, and a helper is no longer importable by a bare name
(``import harness`` found whichever folder pytest had put on sys.path first). Instead tests/ and
every folder of tests under it is a package, and pytest's ``pythonpath = ["."]`` puts the
repository root on sys.path, so every module has one full name, the same under ``pytest`` and
``python -m pytest``: ``tests.support.waiting``, ``tests.guestagent.harness``,
``tests.hostbridge.bridge_harness``. The packages under test keep their own names: tests/hostbridge
is ``tests.hostbridge``, it never shadows ``hostbridge``.

A helper module beside the tests that use it (tests/hostbridge/fakes.py) is imported the same way,
by its full name: ``from tests.hostbridge.fakes import FakeBridge``, never ``from fakes import``.
A program the tests run as a script (tests/hostbridge/hostile_guest.py) gets the repository root
on its PYTHONPATH from tests.support.processes.Process, and puts it on sys.path itself when run by
hand.
"""
