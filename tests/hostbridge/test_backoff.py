"""hostbridge.backoff: the delay between links, and the budget of connects per minute."""

from hostbridge.backoff import BUDGET_WINDOW, Backoff, ReconnectBudget


def test_the_delay_should_double_up_to_its_maximum_with_jitter_in_the_upper_half():
    lows = Backoff(0.05, 1.0, rand=lambda: 0.0)
    assert [round(lows.delay(), 4) for _ in range(7)] == [0.025, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    highs = Backoff(0.05, 1.0, rand=lambda: 0.999999)
    assert [round(highs.delay(), 3) for _ in range(3)] == [0.05, 0.1, 0.2]


def test_only_a_reset_should_bring_the_delay_back_to_the_first():
    b = Backoff(0.05, 5.0, rand=lambda: 0.0)
    for _ in range(4):
        b.delay()
    assert b.peak == 0.8
    b.reset()
    assert b.peak == 0.05


def test_the_budget_should_allow_per_minute_connects_then_wait_for_the_oldest_to_age():
    now = [100.0]
    budget = ReconnectBudget(3, clock=lambda: now[0])
    for _ in range(3):
        assert budget.wait() == 0.0
        budget.spend()
        now[0] += 1.0
    # 3 connects at 100, 101, 102; it is 103: the 4th may go when the one at 100 is a window old.
    assert budget.wait() == 100.0 + BUDGET_WINDOW - 103.0
    now[0] = 100.0 + BUDGET_WINDOW
    assert budget.wait() == 0.0
