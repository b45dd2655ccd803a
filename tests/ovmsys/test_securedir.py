"""ovmsys.securedir: a directory that only root (or the daemon's uid) can change, nor those above
it; real directories, owned by another uid where the test runs as root."""

import os
import stat

import pytest

from ovmsys.securedir import UnsafeDirectory, check, secure
from tests.support.tempdirs import short_dir

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")


@pytest.fixture
def base():
    with short_dir() as d:  # mkdtemp: 0700, ours, under /tmp (1777, sticky)
        yield d


def test_a_private_directory_under_tmp_should_pass_and_come_back_resolved(base):
    os.symlink(base, str(base) + "-link")
    try:
        assert check(str(base) + "-link") == str(base)
    finally:
        os.unlink(str(base) + "-link")


def test_missing_directories_should_be_made_and_pass(base):
    made = secure(str(base / "a" / "b"))
    assert made == str(base / "a" / "b")
    assert stat.S_ISDIR(os.lstat(made).st_mode)


@pytest.mark.parametrize("mode, who", [(0o777, "others"), (0o1777, "others"), (0o770, "its group")])
def test_a_directory_writable_by_others_should_be_refused_naming_it(base, mode, who):
    d = base / "state"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeDirectory) as e:
        secure(str(d))
    assert e.value.strerror == (
        "%s is writable by %s (mode %04o); only root may be able to change it" % (d, who, mode)
    )


@as_root
def test_a_directory_owned_by_another_uid_should_be_refused_naming_it(base):
    d = base / "state"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory) as e:
        secure(str(d))
    assert e.value.strerror == (
        "%s is owned by uid %d, not by root; only root may be able to change it" % (d, NOBODY)
    )
    assert check(str(d), uid=NOBODY) == str(d)  # the daemon's own uid may own it


def test_a_directory_above_writable_by_others_without_the_sticky_bit_should_be_refused(base):
    os.chmod(base, 0o777)
    with pytest.raises(UnsafeDirectory) as e:
        secure(str(base / "new" / "state"))
    assert e.value.strerror == (
        "%s is writable by others (mode 0777); only root may be able to change it" % base
    )
    assert not (base / "new").exists()  # nothing made where someone else could interfere


def test_a_sticky_directory_above_should_pass(base):
    os.chmod(base, 0o1777)
    assert secure(str(base / "state")) == str(base / "state")
    os.mkdir(base / "made")
    assert check(str(base / "made" / ".." / "made")) == str(base / "made")
    os.chmod(base / "made", 0o700)
    os.chmod(base, 0o777)  # no longer sticky: whoever can write it could rename "made"
    with pytest.raises(UnsafeDirectory, match=r"^%s, above %s/made, is writable" % (base, base)):
        check(str(base / "made"))


@as_root
def test_a_directory_above_owned_by_another_uid_should_be_refused(base):
    (base / "theirs").mkdir(mode=0o755)
    os.chown(base / "theirs", NOBODY, NOBODY)
    (base / "theirs" / "state").mkdir(mode=0o700)
    with pytest.raises(UnsafeDirectory) as e:
        check(str(base / "theirs" / "state"))
    assert e.value.strerror.startswith(
        "%s, above %s, is owned by uid %d" % (base / "theirs", base / "theirs" / "state", NOBODY)
    )


def test_a_file_should_be_refused_as_not_a_directory(base):
    (base / "f").write_bytes(b"")
    with pytest.raises(UnsafeDirectory, match="is not a directory"):
        check(str(base / "f"))
