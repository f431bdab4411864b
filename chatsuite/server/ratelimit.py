"""The rate limit of SPEC 1.5 (``--rate``), pure: a token bucket with an injected clock.

Invariant: nothing is ever dropped: ``take`` only says how many items may pass now and how long
to wait for the next; the reader thread that asked waits (and so does not read, so TCP pushes
back on that sender alone).
"""

from __future__ import annotations

from collections.abc import Callable

# Waiting exactly the time ``take`` told may refill the bucket to 0.999...: that counts as 1.
EPSILON = 1e-9


class TokenBucket:
    """A rate limit, pure: ``rate`` items a second, up to ``burst`` at once; time from ``clock``.

    ``take(n)`` says how many of ``n`` items may pass now (and spends them) and, when none may,
    how many seconds until one can. A rate of 0 or less lets everything pass.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst  # a new connection may send its burst at once
        self.refilled = clock()

    def take(self, wanted: int) -> tuple[int, float]:
        """``(items that may pass now, seconds to wait when that is 0)``."""
        if self.rate <= 0:
            return wanted, 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        # EPSILON: waiting exactly the time told may refill to 0.999...: that must count as 1.
        if self.tokens < 1 - EPSILON:
            return 0, (1 - self.tokens) / self.rate
        count = min(wanted, int(self.tokens + EPSILON))
        self.tokens = max(0.0, self.tokens - count)
        return count, 0.0
