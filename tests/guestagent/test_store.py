import os

import pytest

from guestagent.cache import Cache
from guestagent.store import CacheStore, StoreError, read, write_atomic
from ovmsys import atomicfile


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
    c.set("k", "v", "guest", 1.0)
    s.save(c)
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
