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
