"""ovmsys.atomicfile: the new content replaces the old one whole, or not at all."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from ovmsys.atomicfile import temp_path, write_atomic


def test_it_should_replace_the_file_and_leave_no_temp_file(tmp_path):
    p = tmp_path / "f"
    write_atomic(str(p), b"one")
    write_atomic(str(p), b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_the_file_should_be_mode_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomic(str(tmp_path / "private"), b"x")
        write_atomic(str(tmp_path / "shared"), b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o644


def test_a_failed_write_should_leave_the_old_file(tmp_path):
    p = tmp_path / "f"
    write_atomic(str(p), b"old")
    os.mkdir(temp_path(str(p)))  # the temp path is taken: the write must fail
    with pytest.raises(IsADirectoryError):
        write_atomic(str(p), b"new")
    assert p.read_bytes() == b"old"


def test_a_failed_rename_should_remove_the_temp_file(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_bytes(b"")  # a non-empty directory cannot be renamed over
    with pytest.raises(OSError):
        write_atomic(str(target), b"new")
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert os.listdir(target) == ["keep"]


def test_a_stale_temp_file_of_a_crash_should_be_overwritten(tmp_path):
    p = tmp_path / "f"
    with open(temp_path(str(p)), "wb") as f:
        f.write(b"half a write from a process that died with our pid")
    os.chmod(temp_path(str(p)), 0o666)
    write_atomic(str(p), b"whole")
    assert p.read_bytes() == b"whole"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_a_missing_directory_should_raise_and_create_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(str(tmp_path / "no" / "f"), b"x")
    assert os.listdir(tmp_path) == []


WRITER = """
import sys
from ovmsys.atomicfile import write_atomic
path, size = sys.argv[1], int(sys.argv[2])
versions = [bytes([c]) * size for c in b"ab"]
n = 0
while True:
    write_atomic(path, versions[n % 2])
    n += 1
    if n == 1:
        print("written", flush=True)
"""


def test_a_kill_during_writes_should_leave_the_old_or_the_new_file_whole(tmp_path):
    size = 4 << 20  # big enough that a kill often lands inside a write
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = str(tmp_path / "f")
    for delay in (0.0, 0.01, 0.03, 0.07, 0.15):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(size)], cwd=root, stdout=subprocess.PIPE
        )
        try:
            assert writer.stdout.readline() == b"written\n"
            time.sleep(delay)
        finally:
            writer.kill()
            writer.wait(timeout=30)
            writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL  # killed while still writing
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == size
        assert data in (b"a" * size, b"b" * size)
