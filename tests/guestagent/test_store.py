import os
import shutil

import pytest

from guestagent.cache import Cache
from guestagent.store import CacheStore, StoreError, read, write_atomic
from ovmproto.limits import EVENT_KEY
from ovmsys import atomicfile
from tests.guestagent.harness import cache_state


def test_write_atomic_should_raise_store_error_and_keep_the_old_file_when_it_cannot_write(
    tmp_path, monkeypatch
):
    p = tmp_path / "f"
    write_atomic(str(p), b"old")
    taken = tmp_path / "taken"
    taken.mkdir()
    monkeypatch.setattr(atomicfile, "temp_path", lambda path: str(taken))
    with pytest.raises(StoreError, match="cannot write %s: File exists" % p):
        write_atomic(str(p), b"new")
    assert p.read_bytes() == b"old"


def test_read_should_refuse_a_symlink_rather_than_read_what_it_points_to(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b'{"format": 1}')
    os.symlink(tmp_path / "elsewhere", tmp_path / "cache.json")
    with pytest.raises(StoreError, match=r"cannot read .*cache\.json: Too many levels"):
        read(str(tmp_path / "cache.json"))


def test_read_should_return_none_for_a_missing_file(tmp_path):
    assert read(str(tmp_path / "none")) is None


def test_cache_store_should_save_and_load(tmp_path):
    s = CacheStore(str(tmp_path), 10, 5)
    c = s.load()
    assert len(c) == 0
    c.begin()
    c.set("k", "v", "guest", 1.0)
    s.commit(c, c.end())
    d = CacheStore(str(tmp_path), 10, 5).load()
    assert d.get("k").value == "v" and d.gid == c.gid


def test_cache_store_should_move_a_corrupt_file_aside_and_start_empty(tmp_path):
    s = CacheStore(str(tmp_path), 10, 5)
    (tmp_path / "cache.json").write_bytes(b"{not json")
    c = s.load()
    assert isinstance(c, Cache) and len(c) == 0
    aside = [n for n in os.listdir(tmp_path) if n.startswith("cache.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == b"{not json"


def test_loading_should_remove_the_temp_file_a_killed_save_left_behind(tmp_path):
    store = CacheStore(str(tmp_path), max_keys=10, max_events=10)
    leftover = tmp_path / "cache.json.tmp-00112233aabbccdd"
    leftover.write_bytes(b'{"half a secret')
    assert len(store.load()) == 0
    assert not leftover.exists()


# -- the journal ------------------------------------------------------------------------------


def _change(store, cache, apply):
    cache.begin()
    apply(cache)
    store.commit(cache, cache.end())


def _set(key, value, ts=1.0):
    return lambda c: c.set(key, value, "guest", ts)


def test_a_set_should_append_to_the_journal_and_leave_a_full_snapshot_alone(tmp_path):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    big = "v" * 8192
    cache.begin()
    cache.put([["k%d" % i, big] for i in range(1023)], "guest", 1.0)  # and "small": full
    store.commit(cache, cache.end())
    snapshot = os.stat(tmp_path / "cache.json")
    assert snapshot.st_size > 1023 * 8192
    journal = os.path.getsize(tmp_path / "cache.journal")
    for i in range(50):
        _change(store, cache, _set("small", str(i)))
    grown = os.path.getsize(tmp_path / "cache.journal") - journal
    assert grown < 50 * 100  # ~60 bytes a change, whatever the cache holds
    again = os.stat(tmp_path / "cache.json")
    assert (again.st_ino, again.st_mtime_ns) == (snapshot.st_ino, snapshot.st_mtime_ns)
    assert cache_state(CacheStore(str(tmp_path), 1024, 64).load()) == cache_state(cache)


def test_the_journal_should_be_compacted_once_it_is_as_large_as_the_snapshot(tmp_path):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    value = "x" * 8000
    for i in range(300):  # 300 x 8 KB: the 1 MiB floor is passed twice
        _change(store, cache, _set("k%d" % (i % 10), value[: 8000 - i]))
        assert os.path.getsize(tmp_path / "cache.journal") < (1 << 20) + 9000
    assert store.compactions == 3  # the first change, then every ~130 changes
    assert cache_state(CacheStore(str(tmp_path), 1024, 64).load()) == cache_state(cache)


def test_loading_should_keep_every_whole_change_and_drop_one_cut_short_at_any_byte(tmp_path):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    _change(store, cache, _set("first", "1"))  # the first change writes the snapshot
    states, sizes = [cache_state(cache)], [os.path.getsize(tmp_path / "cache.journal")]
    steps = [
        _set("a", "é" * 40),
        lambda c: c.follow_epoch("e1"),
        lambda c: c.apply_host_set(1, "b", "2", 2.0),
        lambda c: c.apply_host_set(2, EVENT_KEY, "ev", 3.0),
        lambda c: c.put([["c", "3"], ["a", "4"]], "guest", 4.0),
    ]
    for step in steps:
        _change(store, cache, step)
        states.append(cache_state(cache))
        sizes.append(os.path.getsize(tmp_path / "cache.journal"))
    store.close()
    journal = (tmp_path / "cache.journal").read_bytes()
    for cut in range(sizes[0], len(journal) + 1):
        work = tmp_path / ("cut%d" % cut)
        work.mkdir()
        shutil.copy(tmp_path / "cache.json", work / "cache.json")
        (work / "cache.journal").write_bytes(journal[:cut])
        again = CacheStore(str(work), 1024, 64)
        loaded = again.load()
        whole = max(i for i, size in enumerate(sizes) if size <= cut)
        assert cache_state(loaded) == states[whole], cut
        # What was cut short is gone from the file: the next change follows the last whole one.
        _change(again, loaded, _set("after", "x"))
        assert cache_state(CacheStore(str(work), 1024, 64).load()) == cache_state(loaded), cut
        again.close()


def test_a_damaged_change_before_good_ones_should_keep_those_before_and_set_the_file_aside(
    tmp_path,
):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    for i in range(4):
        _change(store, cache, _set("k%d" % i, "value-%d" % i))
    store.close()
    path = tmp_path / "cache.journal"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"value-2", b"value-X")  # k2 (k0 is in the snapshot): bad CRC
    path.write_bytes(b"\n".join(lines))
    loaded = CacheStore(str(tmp_path), 1024, 64).load()
    assert [e.key for e in loaded.entries()] == ["k0", "k1"]
    aside = [n for n in os.listdir(tmp_path) if n.startswith("cache.journal.corrupt-")]
    assert len(aside) == 1 and b"value-3" in (tmp_path / aside[0]).read_bytes()
    # A fresh snapshot and journal were written at once: loading again finds the same.
    assert cache_state(CacheStore(str(tmp_path), 1024, 64).load()) == cache_state(loaded)


def test_a_compaction_cut_short_after_the_snapshot_should_not_replay_the_old_journal(
    tmp_path, monkeypatch
):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    _change(store, cache, _set("a", "1"))
    _change(store, cache, _set("b", "1"))
    old_journal = (tmp_path / "cache.journal").read_bytes()
    real = atomicfile.write_atomic

    def snapshot_only(path, data, mode=0o600):
        if path.endswith("cache.journal"):
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(atomicfile, "write_atomic", snapshot_only)
    _change(store, cache, lambda c: c.delete("a", "guest", 2.0))  # a delete compacts
    monkeypatch.undo()
    # The snapshot holds the delete; the journal is still the old one, with a's set in it.
    assert (tmp_path / "cache.journal").read_bytes() == old_journal
    loaded = CacheStore(str(tmp_path), 1024, 64).load()
    assert cache_state(loaded) == cache_state(cache) and loaded.get("a") is None
    _change(store, cache, _set("c", "1"))  # the store starts a journal at the next change
    assert cache_state(CacheStore(str(tmp_path), 1024, 64).load()) == cache_state(cache)


def test_a_delete_should_take_the_value_out_of_every_file(tmp_path):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    _change(store, cache, _set("root.password", "hunter2"))
    _change(store, cache, _set("other", "1"))
    _change(store, cache, lambda c: c.delete("root.password", "guest", 2.0))
    for name in os.listdir(tmp_path):
        assert b"hunter2" not in (tmp_path / name).read_bytes(), name


def test_a_failed_append_should_be_cut_back_and_leave_the_files_as_before(tmp_path, monkeypatch):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    _change(store, cache, _set("a", "1"))
    before = cache_state(cache)
    size = os.path.getsize(tmp_path / "cache.journal")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(StoreError, match=r"cannot write .*cache\.journal: No space left"):
        _change(store, cache, _set("a", "2"))
    monkeypatch.undo()
    assert os.path.getsize(tmp_path / "cache.journal") == size
    assert cache_state(store.load()) == before
    _change(store, cache, _set("b", "1"))


def test_a_journal_that_does_not_continue_the_snapshot_should_be_ignored(tmp_path):
    store = CacheStore(str(tmp_path), 1024, 64)
    cache = store.load()
    _change(store, cache, _set("a", "1"))
    store.close()
    other = tmp_path / "other"
    other.mkdir()
    stranger = CacheStore(str(other), 1024, 64)
    c2 = stranger.load()
    _change(stranger, c2, _set("planted", "1"))
    stranger.close()
    shutil.copy(other / "cache.journal", tmp_path / "cache.journal")  # another cache's journal
    loaded = CacheStore(str(tmp_path), 1024, 64).load()
    assert [e.key for e in loaded.entries()] == ["a"]


def test_a_snapshot_written_before_the_journal_existed_should_load_and_start_one(tmp_path):
    legacy = Cache(10, 5)
    legacy.set("k", "v", "guest", 1.0)
    data = legacy.to_bytes().replace(b'"journal":null,', b"")
    assert b"journal" not in data
    (tmp_path / "cache.json").write_bytes(data)
    store = CacheStore(str(tmp_path), 10, 5)
    cache = store.load()
    assert cache.get("k").value == "v"
    _change(store, cache, _set("k2", "v2"))
    assert cache_state(CacheStore(str(tmp_path), 10, 5).load()) == cache_state(cache)
