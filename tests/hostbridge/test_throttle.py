"""hostbridge.throttle: what a guest may send before the bridge stops reading it for a while."""

import logging

from hostbridge.config import Limits
from hostbridge.throttle import PAUSE_MAX, Throttle, TokenBucket
from ovmsys.ratelimit import RateLimitedLog


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_it_should_allow_a_burst_then_ask_to_wait_for_the_debt():
    clock = Clock()
    b = TokenBucket(rate=10, burst=20, clock=clock)
    assert b.take(20) == 0
    assert b.take(5) == 0.5
    clock.t += 1.0  # 10 tokens back: debt of 5 paid, 5 saved
    assert b.take(5) == 0
    assert b.take(1) == 0.1


def test_a_guest_within_its_rates_should_never_be_paused():
    t = Throttle(Limits(), RateLimitedLog(logging.getLogger("t")))
    for _ in range(100):
        assert not t.frames(10)
        assert t.pause(1000) == 0.0


def test_a_flood_should_pause_the_reader_warn_once_and_never_for_long(caplog):
    limits = Limits(frames_per_s=100, frames_burst=10, bytes_per_s=1000, bytes_burst=1000)
    t = Throttle(limits, RateLimitedLog(logging.getLogger("t")))
    with caplog.at_level(logging.WARNING):
        assert t.frames(1000)  # far over the frame rate
        first = t.pause(10)
        assert 0 < first <= PAUSE_MAX
        assert not t.frames(0)
        assert 0 < t.pause(10**9) <= PAUSE_MAX  # bytes alone: capped too
    assert len([r for r in caplog.records if "slowed down" in r.getMessage()]) == 1
