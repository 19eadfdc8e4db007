"""Fixtures shared by the tracker tests: a redis-server, and a state backend of each kind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from daemons.testbed.redis import redis_binary, run_redis
from p2pimage.tracker import MemoryState, RedisState, TrackerState


@pytest.fixture(scope="session")
def redis_port() -> Iterator[int]:
    if redis_binary() is None:
        pytest.skip("redis-server (Debian package redis-server) is not installed")
    with run_redis() as port:
        yield port


_counter = iter(range(1_000_000))


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[TrackerState]:
    """Each test runs once per backend: the same rules must hold in both."""
    if request.param == "memory":
        yield MemoryState()
        return
    import coredis

    port = request.getfixturevalue("redis_port")
    client = coredis.Redis("127.0.0.1", port, decode_responses=False)
    async with client:
        # A fresh prefix per test: tests never see each other's swarms.
        redis_state = RedisState(client, prefix=f"test{next(_counter)}:")
        yield redis_state
        await redis_state.clear()
