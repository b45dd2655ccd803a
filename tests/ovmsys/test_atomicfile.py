"""ovmsys.atomicfile: the new content replaces the old one whole, or not at all."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from ovmsys import atomicfile
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


def test_a_failed_write_should_leave_the_old_file_and_what_was_in_the_way(tmp_path, monkeypatch):
    p = tmp_path / "f"
    write_atomic(str(p), b"old")
    taken = tmp_path / "taken"
    taken.write_bytes(b"someone else's")
    monkeypatch.setattr(atomicfile, "temp_path", lambda path: str(taken))
    with pytest.raises(FileExistsError):  # created, never opened: O_EXCL
        write_atomic(str(p), b"new")
    assert p.read_bytes() == b"old"
    assert taken.read_bytes() == b"someone else's"  # not ours: neither written nor removed


def test_a_failed_rename_should_remove_the_temp_file(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_bytes(b"")  # a non-empty directory cannot be renamed over
    with pytest.raises(OSError):
        write_atomic(str(target), b"new")
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert os.listdir(target) == ["keep"]


def old_temp_names(path, pids):
    """Every name the temp file had before issue 8: PATH.tmp-PID, predictable by anyone."""
    return ["%s.tmp-%d" % (path, pid) for pid in pids]


def test_a_symlink_planted_at_a_temp_name_should_never_be_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o644)
    p = tmp_path / "cache.json"
    planted = old_temp_names(str(p), [os.getpid()])
    for name in planted:
        os.symlink(victim, name)
    write_atomic(str(p), b"secret value")
    write_atomic(str(p), b"secret value, again")
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    assert not p.is_symlink() and p.read_bytes() == b"secret value, again"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert all(os.readlink(name) == str(victim) for name in planted)  # left as they were
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["victim", "cache.json"] + [os.path.basename(n) for n in planted]
    )


def test_temp_names_should_differ_every_time(tmp_path):
    names = {temp_path(str(tmp_path / "f")) for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(str(tmp_path / "f.tmp-")) for n in names)


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


def test_leftover_temp_files_of_a_killed_write_should_be_removed_and_nothing_else(tmp_path):
    target = tmp_path / "cache.json"
    target.write_bytes(b"current")
    leftover = tmp_path / "cache.json.tmp-0123456789abcdef"
    leftover.write_bytes(b"a secret half written")
    keep = [
        tmp_path / "cache.json.tmp-notours",  # not the name shape write_atomic() uses
        tmp_path / "other.json.tmp-0123456789abcdef",  # another file's
    ]
    for path in keep:
        path.write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"precious")
    link = tmp_path / "cache.json.tmp-fedcba9876543210"
    link.symlink_to(elsewhere)
    assert atomicfile.remove_leftovers(str(target)) == [leftover.name]
    assert not leftover.exists() and all(p.exists() for p in keep)
    assert link.is_symlink() and elsewhere.read_bytes() == b"precious"
    assert target.read_bytes() == b"current"
