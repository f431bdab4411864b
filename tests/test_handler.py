"""The handler's pure parts: the token bucket of the rate limit, driven by a fake clock."""

from __future__ import annotations

import pytest

from chatsuite.server.ratelimit import TokenBucket


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_new_bucket_lets_its_burst_pass_at_once() -> None:
    """A fresh bucket of rate 50 and burst 100 admits 100 items at once, then none."""
    clock = FakeClock()
    bucket = TokenBucket(50, 100, clock)
    assert bucket.take(160) == (100, 0.0)
    count, wait = bucket.take(60)
    assert count == 0
    assert wait == pytest.approx(1 / 50)


def test_the_bucket_refills_at_its_rate_and_never_past_its_burst() -> None:
    """After t seconds rate*t more items pass, and a long pause refills only up to the burst."""
    clock = FakeClock()
    bucket = TokenBucket(10, 20, clock)
    assert bucket.take(20) == (20, 0.0)
    clock.now += 0.5
    assert bucket.take(100) == (5, 0.0)
    clock.now += 3600
    assert bucket.take(100) == (20, 0.0)


def test_the_wait_is_the_time_to_the_next_whole_token() -> None:
    """With half a token left at rate 4, the next item waits 1/8 s; after that it passes."""
    clock = FakeClock()
    bucket = TokenBucket(4, 8, clock)
    assert bucket.take(8) == (8, 0.0)
    clock.now += 0.125  # half a token
    count, wait = bucket.take(1)
    assert count == 0
    assert wait == pytest.approx(0.125)
    clock.now += wait
    assert bucket.take(3) == (1, 0.0)


def test_a_flood_passes_at_the_rate_and_nothing_is_lost() -> None:
    """Draining 160 items at rate 50 burst 100, waiting as told, admits all 160 in 1.2 s."""
    clock = FakeClock()
    bucket = TokenBucket(50, 100, clock)
    start, passed = clock.now, 0
    while passed < 160:
        count, wait = bucket.take(160 - passed)
        passed += count
        clock.now += wait
    assert passed == 160
    assert clock.now - start == pytest.approx(60 / 50)


def test_rate_zero_is_no_limit() -> None:
    """A rate of 0 admits everything at once, whatever the clock says."""
    bucket = TokenBucket(0, 0, FakeClock())
    assert bucket.take(10**6) == (10**6, 0.0)
