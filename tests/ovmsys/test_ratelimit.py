"""ovmsys.ratelimit: a warning that repeats is logged once per interval, per kind, with a count."""

import logging

import pytest

from ovmsys.ratelimit import RateLimitedLog


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


def messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_it_should_warn_once_per_interval_and_count_what_it_held_back(caplog, clock):
    w = RateLimitedLog(logging.getLogger("t"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        assert w.warn("x", "bad %s", "thing") is True
        for _ in range(4):
            assert w.warn("x", "bad %s", "thing") is False
        clock.t += 59
        w.warn("x", "bad %s", "thing")
        clock.t += 2
        assert w.warn("x", "bad %s", "thing") is True
        clock.t += 61
        w.warn("x", "bad %s", "thing")
    assert messages(caplog) == [
        "bad thing",
        "bad thing (and 5 more like it since the last warning)",
        "bad thing",  # nothing was held back in between: no count
    ]


def test_each_kind_should_have_its_own_interval(caplog, clock):
    w = RateLimitedLog(logging.getLogger("t"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        w.warn("read", "read failed")
        w.warn("write", "write failed")
        w.warn("read", "read failed")
    assert messages(caplog) == ["read failed", "write failed"]


def test_reset_should_make_the_next_warning_of_that_kind_news(caplog, clock):
    w = RateLimitedLog(logging.getLogger("t"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        w.warn("disk", "cannot save")
        w.warn("disk", "cannot save")  # held back...
        w.warn("peer", "bad peer")
        w.reset("disk")  # ...and forgotten: the failure is over
        w.warn("disk", "cannot save")
        w.warn("peer", "bad peer")  # another kind is not reset
    assert messages(caplog) == ["cannot save", "bad peer", "cannot save"]


def test_it_should_log_at_warning_level_through_the_given_logger(caplog, clock):
    w = RateLimitedLog(logging.getLogger("some.module"), clock=clock)
    with caplog.at_level(logging.WARNING):
        w.warn("x", "careful")
    assert [(r.name, r.levelno) for r in caplog.records] == [("some.module", logging.WARNING)]
