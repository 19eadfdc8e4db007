"""Token buckets: the pure policy and the trio limiter (virtual time, so no wall clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pimage.errors import LocalProtocolError
from p2pimage.swarm.ratelimit import RateLimiter, TokenBucket


def test_bucket_allows_burst_then_paces() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0
    assert bucket.reserve(250, 0.0) == pytest.approx(0.25)
    # After the debt is paid off by time, the bucket refills up to the burst only.
    assert bucket.available(10.0) == pytest.approx(500)


@given(st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=50))
def test_bucket_long_run_rate_never_exceeds_rate(sizes: list[int]) -> None:
    rate, burst = 10_000.0, 20_000.0
    bucket = TokenBucket(rate, burst=burst, now=0.0)
    now = 0.0
    for size in sizes:
        now += bucket.reserve(size, now)
    # Everything sent by `now` fits in burst + rate * elapsed.
    assert sum(sizes) <= burst + rate * now + 1e-6


def test_bad_rate_is_callers_error() -> None:
    with pytest.raises(LocalProtocolError):
        TokenBucket(0)
    with pytest.raises(LocalProtocolError):
        RateLimiter(-1)


async def _drain(limiter: RateLimiter, total: int, chunk: int) -> None:
    sent = 0
    while sent < total:
        await limiter.acquire(chunk)
        sent += chunk


def test_limiter_shared_by_tasks_holds_aggregate_rate() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> float:
        limiter = RateLimiter(1_000_000, burst=64 * 1024)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(_drain, limiter, 1_000_000, 16 * 1024)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=clock)
    # 4 MB at 1 MB/s with a 64 KiB burst: just under 4 virtual seconds.
    assert 3.8 <= elapsed <= 4.2


async def test_unlimited_limiter_never_waits() -> None:
    limiter = RateLimiter(None)
    with trio.fail_after(1):
        for _ in range(1000):
            await limiter.acquire(1 << 20)
    assert limiter.total == 1000 << 20


def test_acquire_says_whether_it_slept() -> None:
    """A writer that was held back has yielded already and skips its yield after the
    send: acquire tells it so (issue #15, task steps per batch)."""

    async def main() -> None:
        limiter = RateLimiter(1000, burst=500)
        assert await limiter.acquire(500) is False  # the burst at hand
        before = trio.current_time()
        assert await limiter.acquire(250) is True
        assert trio.current_time() - before == pytest.approx(0.25)
        assert await limiter.acquire(1, first=True) is True  # (the debt: 1 ms)
        assert await RateLimiter(None).acquire(10**9) is False

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_acquires_are_served_in_arrival_order() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    finished: dict[str, float] = {}

    async def main() -> None:
        limiter = RateLimiter(1_000_000, burst=64 * 1024)
        start = trio.current_time()

        async def bulk() -> None:
            for _ in range(4):  # 4 x 500 kB: ~2 s
                await limiter.acquire(500_000)
            finished["bulk"] = trio.current_time() - start

        async def late() -> None:
            await trio.sleep(0.1)
            await limiter.acquire(100_000)  # waits behind the 500 kB queued before it
            finished["late"] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bulk)
            nursery.start_soon(late)

    trio.run(main, clock=clock)
    assert 0.5 <= finished["late"] < 1.2
    assert finished["bulk"] >= 2.0  # the late bytes were charged too


def test_many_waiters_finish_in_arrival_order_at_the_rate() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    done: list[int] = []

    async def main() -> float:
        limiter = RateLimiter(1_000_000, burst=64 * 1024)
        start = trio.current_time()

        async def one(i: int) -> None:
            await trio.sleep(i * 0.001)  # arrive in order i, all while the first waits
            await limiter.acquire(100_000)
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=clock)
    assert done == list(range(20))
    # 2 MB at 1 MB/s after a 64 KiB burst.
    assert 1.9 <= elapsed <= 2.0


def test_a_cancelled_waiter_gives_its_bytes_back() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    finished: dict[str, float] = {}

    async def main() -> None:
        limiter = RateLimiter(1_000_000, burst=64 * 1024)
        start = trio.current_time()
        await limiter.acquire(64 * 1024)  # the burst, spent
        with trio.move_on_after(0.1) as scope:
            await limiter.acquire(5_000_000)  # 5 s of debt, given up after 0.1 s
        assert scope.cancelled_caught
        await limiter.acquire(100_000)
        finished["next"] = trio.current_time() - start

    trio.run(main, clock=clock)
    # The bucket is full again (a burst) at 0.1 s: the next caller waits only for its
    # own 100 kB beyond the burst (34 ms), not behind the abandoned 5 MB.
    assert finished["next"] == pytest.approx(0.1 + (100_000 - 64 * 1024) / 1_000_000)


def test_bucket_refund_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    assert bucket.reserve(2000, 0.0) == pytest.approx(1.5)
    bucket.refund(10_000, 0.0)
    assert bucket.available(0.0) == pytest.approx(500)


def test_bucket_reserve_first_waits_for_its_own_bytes_only() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    assert bucket.reserve(3000, 0.0) == pytest.approx(2.5)  # a queue of 2.5 s
    # Ahead of that queue: 200 bytes wait 0.2 s, not 2.7 s.
    assert bucket.reserve_first(200, 0.0) == pytest.approx(0.2)
    # The next caller in arrival order waits for both.
    assert bucket.reserve(100, 0.0) == pytest.approx(2.8)
    # With tokens at hand, a first caller takes them at once.
    fresh = TokenBucket(1000, burst=500, now=0.0)
    assert fresh.reserve_first(400, 0.0) == 0.0
    assert fresh.reserve_first(300, 0.0) == pytest.approx(0.2)


@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=100_000), st.booleans()),
        min_size=1,
        max_size=50,
    )
)
def test_bucket_going_first_never_exceeds_the_rate(calls: list[tuple[int, bool]]) -> None:
    rate, burst = 10_000.0, 20_000.0
    bucket = TokenBucket(rate, burst=burst, now=0.0)
    now = 0.0
    for size, first in calls:
        now += bucket.reserve_first(size, now) if first else bucket.reserve(size, now)
    # One caller at a time (each waits before the next arrives): everything sent by
    # `now` fits in burst + rate * elapsed, whichever way each went.
    assert sum(size for size, _ in calls) <= burst + rate * now + 1e-6


def test_a_first_caller_passes_the_queue_and_the_queue_pays_for_it() -> None:
    """A fetcher's registry reads on its downlink: queued peer blocks do not delay them,
    and the link's rate holds (the peers' bytes wait for the registry's)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    finished: dict[str, float] = {}

    async def main() -> None:
        limiter = RateLimiter(1_000_000, burst=64 * 1024)
        start = trio.current_time()

        async def peer(i: int) -> None:
            await limiter.acquire(500_000)  # 8 peers: 4 MB queued, ~4 s
            finished[f"peer{i}"] = trio.current_time() - start

        async def origin() -> None:
            await trio.sleep(0.1)
            for _ in range(4):  # 4 x 250 kB, each after the last
                await limiter.acquire(250_000, first=True)
            finished["origin"] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(peer, i)
            nursery.start_soon(origin)

    trio.run(main, clock=clock)
    # 1 MB at the link's rate from 0.1 s, not behind the 4 MB queued before it.
    assert finished["origin"] == pytest.approx(1.1, abs=0.01)
    # The last peers' bytes waited for the registry's as well: 5 MB at 1 MB/s in all.
    assert max(v for k, v in finished.items() if k.startswith("peer")) >= 4.9
