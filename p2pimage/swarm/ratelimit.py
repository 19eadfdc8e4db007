"""Token-bucket bandwidth limits.

:class:`TokenBucket` is the pure policy (callers pass ``now``); :class:`RateLimiter` is the
trio wrapper that sleeps until the bytes are allowed. A limiter with ``rate=None`` is
unlimited and costs nothing. One limiter may be shared by many tasks (a node's upload
cap over all its peer connections, the registry's egress cap over all origin readers):
callers are served in arrival order, so a large read cannot starve small ones forever.
The order needs no lock: each caller takes its bytes from the bucket when it arrives,
into debt, and sleeps until the debt up to its bytes is paid, so every later caller
sleeps longer than every earlier one. A caller may instead go first (``first=True``):
it waits only for its own bytes and leaves its debt to the callers after it (a
fetcher's registry reads on its downlink: the registry is the scarcest link).
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
        # Bytes taken by reserve_first so far: a caller already waiting when some went
        # first waits that much longer (RateLimiter.acquire), so the rate holds.
        self.first_bytes = 0

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

    def reserve_first(self, amount: int, now: float) -> float:
        """Take ``amount`` bytes now ahead of the debt of earlier callers: wait only for
        the part of ``amount`` not covered by tokens at hand (at most ``amount / rate``).
        The debt grows by ``amount``, so later callers wait for these bytes, and so do
        earlier callers still waiting (they see :attr:`first_bytes` grow): the rate
        holds; only the order changes."""
        self._refill(now)
        at_hand = max(self._tokens, 0.0)
        self._tokens -= amount
        self.first_bytes += amount
        return max(0.0, amount - at_hand) / self.rate

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

    async def acquire(self, amount: int, *, first: bool = False) -> bool:
        """Wait until ``amount`` bytes may pass; True if the caller slept (yielded to the
        scheduler), False if the bytes passed at once. Callers are served in arrival order,
        except that a caller with ``first`` waits only for its own bytes
        (:meth:`TokenBucket.reserve_first`).

        Origin reads go first on a fetcher's downlink. In arrival order, one fetcher's
        registry reads got one turn in 32 at 32 nodes (a turn per peer sending to it):
        the registry's part took 5-8.8 s where its cap allowed 4, and every node waited
        for it (docs/benchmarks.md, "The 32-node swarm"). The bytes are taken on arrival
        (no lock: a queued caller costs one timed sleep, not a lock's park, wake and
        hand-over as well); a caller cancelled while it waits gives them back.
        """
        self.total += amount
        if self.rate is None:
            return False
        bucket = self._bucket
        now = trio.current_time()
        if bucket is None:
            bucket = self._bucket = TokenBucket(self.rate, self._burst, now=now)
        wait = bucket.reserve_first(amount, now) if first else bucket.reserve(amount, now)
        if wait <= 0 or not math.isfinite(wait):
            return False
        try:
            passed = bucket.first_bytes
            await trio.sleep(wait)
            # Bytes that went first while we waited were meant to pass before ours.
            while not first and bucket.first_bytes > passed:
                ahead, passed = bucket.first_bytes - passed, bucket.first_bytes
                await trio.sleep(ahead / bucket.rate)
        except trio.Cancelled:
            bucket.refund(amount, trio.current_time())
            raise
        return True
