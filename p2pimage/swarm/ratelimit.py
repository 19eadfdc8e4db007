"""Token-bucket bandwidth limits.

:class:`TokenBucket` is the pure policy (callers pass ``now``); :class:`RateLimiter` is the
trio wrapper that sleeps until the bytes are allowed. A limiter with ``rate=None`` is
unlimited and costs nothing. One limiter may be shared by many tasks (a node's upload
cap over all its peer connections, the registry's egress cap over all origin readers):
callers are served in arrival order, so a large read cannot starve small ones forever.
The order needs no lock: each caller takes its bytes from the bucket when it arrives,
into debt, and sleeps until the debt up to its bytes is paid, so every later caller
sleeps longer than every earlier one.
"""

from __future__ import annotations

import math

import trio

from p2pimage.errors import LocalProtocolError

__all__ = ["RateLimiter", "TokenBucket"]

# Default burst: 100 ms worth of the rate, but at least 64 KiB so one 16 KiB block plus
# headers always fits; a larger burst lets loopback transfers overshoot the cap briefly.
DEFAULT_BURST_S = 0.1
MIN_BURST_BYTES = 64 * 1024


class TokenBucket:
    """A token bucket of ``rate`` bytes/s holding at most ``burst`` bytes."""

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0) -> None:
        if rate <= 0:
            raise LocalProtocolError("rate must be positive")
        self.rate = float(rate)
        default_burst = max(rate * DEFAULT_BURST_S, MIN_BURST_BYTES)
        self.burst = float(burst if burst is not None else default_burst)
        self._tokens = self.burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def reserve(self, amount: int, now: float) -> float:
        """Take ``amount`` bytes now (going into debt if needed); return seconds to wait.

        Debt lets a request larger than the burst through after a proportional wait,
        instead of never.
        """
        self._refill(now)
        self._tokens -= amount
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate

    def refund(self, amount: int, now: float) -> None:
        """Give back ``amount`` bytes taken by :meth:`reserve` that never passed (the
        caller gave up waiting), up to the burst."""
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + amount)

    def available(self, now: float) -> float:
        self._refill(now)
        return self._tokens


class RateLimiter:
    """Trio wrapper around :class:`TokenBucket`; ``rate=None`` means unlimited."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        if rate is not None and rate <= 0:
            raise LocalProtocolError("rate must be positive or None")
        self.rate = rate
        self._burst = burst
        self._bucket: TokenBucket | None = None
        self.total = 0

    @property
    def limited(self) -> bool:
        return self.rate is not None

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` bytes may pass; callers are served in arrival order.

        Origin reads share a fetcher's downlink with its peers in this same order. (They
        once skipped the queue: with 3 s request queues twenty peer connections could
        starve them; with 1 s queues the skip only cost, see docs/benchmarks.md, "Tuned
        defaults".) The bytes are taken on arrival (no lock: a queued caller costs one
        timed sleep, not a lock's park, wake and hand-over as well); a caller cancelled
        while it waits gives them back.
        """
        self.total += amount
        if self.rate is None:
            return
        bucket = self._bucket
        now = trio.current_time()
        if bucket is None:
            bucket = self._bucket = TokenBucket(self.rate, self._burst, now=now)
        wait = bucket.reserve(amount, now)
        if wait <= 0 or not math.isfinite(wait):
            return
        try:
            await trio.sleep(wait)
        except trio.Cancelled:
            bucket.refund(amount, trio.current_time())
            raise
