import pytest

from daemons.limiter import SlidingWindowLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_admits_at_most_limit_per_window() -> None:
    clock = Clock()
    lim = SlidingWindowLimiter(10, 1.0, clock)
    assert lim.acquire(4) == 4
    assert lim.acquire(10) == 6
    assert lim.acquire(1) == 0
    clock.t += 0.999
    assert lim.acquire(1) == 0
    clock.t += 0.002
    assert lim.acquire(20) == 10


def test_no_double_burst_at_window_edge() -> None:
    # A fixed window would admit 10 at t=0.99 and 10 more at t=1.01.
    clock = Clock()
    lim = SlidingWindowLimiter(10, 1.0, clock)
    clock.t += 0.99
    assert lim.acquire(10) == 10
    clock.t += 0.02
    assert lim.acquire(10) == 0
    clock.t += 0.98
    assert lim.acquire(10) == 10


def test_any_window_holds_at_most_limit() -> None:
    clock = Clock()
    lim = SlidingWindowLimiter(7, 0.5, clock)
    admitted: list[tuple[float, int]] = []
    for step in range(400):
        clock.t = 1000.0 + step * 0.01
        admitted.append((clock.t, lim.acquire(step % 4)))
    for start, _ in admitted:
        in_window = sum(n for t, n in admitted if start <= t < start + 0.5)
        assert in_window <= 7


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(0, 1.0)
    assert SlidingWindowLimiter(1, 1.0).acquire(0) == 0


def test_fair_limiter_shares_the_limit_among_active_callers() -> None:
    from daemons.limiter import FairLimiter

    clock = Clock()
    lim = FairLimiter(100, 1.0, clock)
    assert lim.acquire(80, "alice") == 80  # alone: the whole limit is hers to take
    clock.t += 0.1
    assert lim.acquire(80, "bob") == 20  # what is left, and no more than half
    clock.t += 1.0  # alice's 80 have expired
    got = {"alice": 0, "bob": 0}
    for _ in range(50):  # both hammering, alice first each round
        clock.t += 0.1
        for who in ("alice", "bob"):
            got[who] += lim.acquire(50, who)
    assert abs(got["alice"] - got["bob"]) <= 50, got
    assert sum(got.values()) <= 100 * 6  # never beyond the limit in any window


def test_fair_limiter_forgets_callers_idle_for_a_window() -> None:
    from daemons.limiter import FairLimiter

    clock = Clock()
    lim = FairLimiter(10, 1.0, clock)
    assert lim.acquire(5, "a") == 5
    assert lim.acquire(10, "b") == 5  # two sharing: 5 each
    clock.t += 1.5
    assert lim.acquire(10, "a") == 10  # b went quiet: a alone again
