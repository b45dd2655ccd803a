"""hostbridge.mirror: the bookkeeping of a guest's copied keys."""

from hostbridge.mirror import Mirror


def test_it_should_apply_sets_deletes_and_clear():
    m = Mirror(10, 10000)
    m.apply("set", "a", "1", 1.0, "guest")
    m.apply("set", "b", "2", 2.0, "host")
    m.apply("set", "a", "3", 3.0, "guest")
    assert list(m.entries) == ["b", "a"] and m.entries["a"].value == "3"
    m.apply("del", "b", None, 4.0, "guest")
    assert list(m.entries) == ["a"]
    m.apply("clear", None, None, 5.0, "guest")
    assert m.entries == {} and m.bytes == 0


def test_it_should_refuse_keys_over_the_quota_and_count_them():
    m = Mirror(2, 10000)
    assert m.apply("set", "a", "1", 1.0, "guest")
    assert m.apply("set", "b", "1", 1.0, "guest")
    assert not m.apply("set", "c", "1", 1.0, "guest")
    assert m.apply("set", "a", "2", 1.0, "guest")  # replacing stays within the quota
    assert m.dropped == 1 and set(m.entries) == {"a", "b"}


def test_it_should_refuse_bytes_over_the_quota():
    m = Mirror(100, 50)
    assert m.apply("set", "a", "x" * 40, 1.0, "guest")
    assert not m.apply("set", "b", "x" * 40, 1.0, "guest")
    assert m.bytes == 41


def test_it_should_hide_a_host_secret_until_the_guest_overwrites_it():
    m = Mirror(10, 10000)
    m.hide("pw")
    m.apply("set", "pw", "secret", 1.0, "host")
    assert m.entries["pw"].hidden
    rows, _, _, _ = m.take_dirty()
    assert rows[0][1].hidden
    m.apply("set", "pw", "guest-own", 2.0, "guest")
    assert not m.entries["pw"].hidden and "pw" not in m.hidden
    _, _, unhidden, _ = m.take_dirty()
    assert unhidden == ["pw"]


def test_it_should_report_only_what_changed_since_the_last_take():
    m = Mirror(10, 10000)
    m.apply("set", "a", "1", 1.0, "guest")
    m.apply("set", "b", "1", 1.0, "guest")
    m.take_dirty()
    assert not m.dirty
    m.apply("del", "a", None, 1.0, "guest")
    rows, deleted, _, replace = m.take_dirty()
    assert (rows, deleted, replace) == ([], ["a"], False)
    m.replace([("z", "9", 3.0, "guest")], "gid", 7)
    rows, _, _, replace = m.take_dirty()
    assert replace and [k for k, _ in rows] == ["z"] and (m.gid, m.gseq) == ("gid", 7)


def test_a_change_over_the_quota_should_drop_the_keys_old_value_not_keep_it():
    m = Mirror(100, 50)
    assert m.apply("set", "a", "x" * 10, 1.0, "guest")
    m.take_dirty()
    assert not m.apply("set", "a", "y" * 60, 2.0, "guest")  # the guest's new value is too big
    assert "a" not in m.entries and m.bytes == 0
    rows, deleted, _, _ = m.take_dirty()
    assert (rows, deleted) == ([], ["a"])  # and the saved copy forgets it too


def test_changes_given_back_after_a_failed_save_should_be_taken_again_with_what_came_since():
    m = Mirror(10, 10000)
    m.apply("set", "a", "1", 1.0, "guest")
    m.apply("set", "b", "1", 1.0, "guest")
    m.take_dirty()
    m.hide("pw")
    m.unhide("pw")
    m.apply("set", "a", "2", 2.0, "guest")
    m.apply("del", "b", None, 2.0, "guest")
    rows, deleted, unhidden, replace = m.take_dirty()
    assert not m.dirty
    m.apply("set", "b", "3", 3.0, "guest")  # after the take, before the failure
    m.untake([k for k, _ in rows], deleted, unhidden, replace)
    rows, deleted, unhidden, replace = m.take_dirty()
    assert sorted((k, e.value) for k, e in rows) == [("a", "2"), ("b", "3")]
    assert (deleted, unhidden, replace) == ([], ["pw"], False)
    m.replace([("z", "9", 3.0, "guest")], "gid", 7)
    rows, deleted, unhidden, replace = m.take_dirty()
    m.untake([k for k, _ in rows], deleted, unhidden, replace)
    rows, _, _, replace = m.take_dirty()
    assert replace and [k for k, _ in rows] == ["z"]
