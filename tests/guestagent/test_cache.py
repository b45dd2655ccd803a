import pytest

from guestagent.cache import Cache, CacheError
from ovmproto.limits import EVENT_KEY, KEY_MAX, VALUE_MAX
from ovmproto.messages import Changed
from tests.guestagent.harness import cache_state


def test_it_should_keep_value_time_and_origin_of_each_entry():
    c = Cache()
    c.set("a", "1", "guest", 10.0)
    c.apply_host_set(1, "b", "2", 11.0)
    a, b = c.entries()
    assert (a.key, a.value, a.ts, a.origin) == ("a", "1", 10.0, "guest")
    assert (b.key, b.value, b.ts, b.origin) == ("b", "2", 11.0, "host")


def test_it_should_list_in_the_order_keys_were_last_set():
    c = Cache()
    for k in "abc":
        c.set(k, k, "guest", 1.0)
    c.set("a", "again", "guest", 2.0)
    assert [e.key for e in c.entries()] == ["b", "c", "a"]


def test_every_change_should_count_in_gseq_and_be_announced():
    c = Cache()
    ch = c.set("a", "1", "guest", 1.0)
    assert ch == Changed(gseq=1, op="set", ts=1.0, origin="guest", key="a", value="1")
    assert c.delete("a", "guest", 2.0).gseq == 2
    c.set("b", "1", "guest", 3.0)
    assert c.clear("host", 4.0) == Changed(gseq=4, op="clear", ts=4.0, origin="host")
    assert c.gseq == 4


def test_deleting_a_missing_key_or_clearing_an_empty_cache_should_change_nothing():
    c = Cache()
    assert c.delete("nope", "guest", 1.0) is None
    assert c.clear("guest", 1.0) is None
    assert c.gseq == 0


@pytest.mark.parametrize(
    "key,value,code",
    [
        ("k" * (KEY_MAX + 1), "v", "key_too_long"),
        ("é" * 128 + "x", "v", "key_too_long"),
        ("k", "v" * (VALUE_MAX + 1), "value_too_long"),
        ("a=b", "v", "invalid_key"),
        ("a\nb", "v", "invalid_key"),
        ("", "v", "invalid_key"),
    ],
)
def test_it_should_refuse_keys_and_values_over_the_limits_and_keep_what_it_had(key, value, code):
    c = Cache()
    c.set("keep", "me", "guest", 1.0)
    with pytest.raises(CacheError) as e:
        c.set(key, value, "guest", 2.0)
    assert e.value.code == code
    assert [(x.key, x.value) for x in c.entries()] == [("keep", "me")] and c.gseq == 1


def test_it_should_accept_a_key_and_value_exactly_at_the_limits():
    c = Cache()
    c.set("k" * KEY_MAX, "v" * VALUE_MAX, "guest", 1.0)
    c.set("é" * (KEY_MAX // 2), "€" * (VALUE_MAX // 4) + "xx"[: VALUE_MAX % 4], "guest", 1.0)
    assert len(c) == 2


def test_put_should_apply_all_or_none():
    c = Cache()
    with pytest.raises(CacheError):
        c.put([("a", "1"), ("b=", "2")], "guest", 1.0)
    assert len(c) == 0 and c.gseq == 0
    changes = c.put([("a", "1"), ("b", "2")], "guest", 1.0)
    assert [ch.gseq for ch in changes] == [1, 2]


def test_it_should_refuse_new_keys_over_the_quota_but_allow_updates():
    c = Cache(max_keys=2)
    c.put([("a", "1"), ("b", "2")], "guest", 1.0)
    with pytest.raises(CacheError) as e:
        c.set("c", "3", "guest", 2.0)
    assert e.value.code == "quota" and "limit is 2 keys" in str(e.value)
    c.set("a", "updated", "guest", 3.0)
    with pytest.raises(CacheError):
        c.put([("a", "x"), ("c", "y")], "guest", 4.0)
    assert c.get("a").value == "updated"


def test_host_messages_should_apply_once_per_epoch():
    c = Cache()
    c.follow_epoch("E1")
    assert not c.is_duplicate(1)
    c.apply_host_set(1, "a", "1", 1.0)
    assert c.is_duplicate(1) and not c.is_duplicate(2)
    c.apply_host_delete(2, "a", 2.0)
    assert c.hseq == 2 and c.get("a") is None
    c.follow_epoch("E1")
    assert c.hseq == 2
    c.follow_epoch("E2")
    assert c.hseq == 0 and not c.is_duplicate(1)


def test_a_vmapievent_should_be_an_event_not_a_key_and_the_list_bounded():
    c = Cache(max_events=3)
    for i in range(5):
        assert c.apply_host_set(i + 1, EVENT_KEY, "ev%d" % i, float(i)) is None
    assert len(c) == 0 and c.gseq == 0 and c.hseq == 5
    assert [e.value for e in c.events()] == ["ev2", "ev3", "ev4"]


def test_it_should_round_trip_through_bytes():
    c = Cache(max_events=4)
    c.follow_epoch("E")
    c.apply_host_set(7, "h", "host value", 1.5)
    c.set("ключ", "значение \x00\n", "guest", 2.5)
    c.add_event("boom", 3.0)
    d = Cache.from_bytes(c.to_bytes(), max_events=4)
    assert (d.gid, d.gseq, d.epoch, d.hseq) == (c.gid, c.gseq, "E", 7)
    assert d.entries() == c.entries() and d.events() == c.events()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"format": 99}',
        b'{"format": 1, "gid": "x"}',
        b'{"format":1,"gid":"x","gseq":0,"epoch":null,"hseq":0,'
        b'"entries":[["k",1,0,"host"]],"events":[]}',
    ],
)
def test_it_should_report_a_corrupt_file_as_corrupt(data):
    with pytest.raises(CacheError) as e:
        Cache.from_bytes(data)
    assert e.value.code == "corrupt"


def test_repr_should_never_show_a_value():
    c = Cache()
    c.set("pw", "hunter2", "guest", 1.0)
    assert "hunter2" not in repr(c.entries()) and "hunter2" not in repr(
        c.set("pw", "hunter2", "guest", 2.0)
    )


def test_replaying_the_recorded_ops_should_rebuild_the_same_cache():
    c = Cache(max_events=2)
    twin = Cache(max_events=2, gid=c.gid)
    steps = [
        lambda: c.set("a", "1", "guest", 1.0),
        lambda: c.put([["b", "2"], ["a", "3"]], "guest", 2.5),
        lambda: c.follow_epoch("e1"),
        lambda: c.apply_host_set(1, "c", "4", 3.0),
        lambda: c.apply_host_set(2, EVENT_KEY, "ev1", 4.0),
        lambda: c.apply_host_set(3, EVENT_KEY, "ev2", 5.0),
        lambda: c.add_event("ev3", 6.0),  # the oldest event drops out
        lambda: c.apply_host_delete(4, "b", 7.0),
        lambda: c.clear("guest", 8.0),
        lambda: c.set("d", "5", "host", 9.0),
    ]
    for step in steps:
        c.begin()
        step()
        twin.replay(c.end())
        assert cache_state(twin) == cache_state(c)


def test_a_refused_change_should_record_no_ops():
    c = Cache(max_keys=1)
    c.set("a", "1", "guest", 1.0)
    c.begin()
    with pytest.raises(CacheError):
        c.put([["b", "2"], ["c", "3"]], "guest", 2.0)
    assert c.end() == []


def test_replay_should_apply_nothing_of_a_change_with_an_op_it_does_not_know():
    c = Cache()
    with pytest.raises(ValueError):
        c.replay([["s", "a", "1", 1.0, "guest"], ["s", "b", "1", 1.0, "martian"]])
    with pytest.raises(ValueError):
        c.replay([["d", "a"], ["x"]])
    assert len(c) == 0 and c.gseq == 0


def test_replay_should_keep_keys_beyond_a_lowered_limit():
    c = Cache(max_keys=1)
    c.replay([["s", "a", "1", 1.0, "guest"], ["s", "b", "2", 1.0, "guest"]])
    assert [e.key for e in c.entries()] == ["a", "b"]
