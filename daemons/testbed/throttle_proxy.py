"""A TCP relay with one shared bandwidth cap: the registry's egress link in benchmarks and
in the local cluster demo.

Every byte the upstream (the registry) sends to any client passes one token bucket, so
the cap holds for the registry as a whole, as a real uplink would, and not per reader.
Bytes sent upstream (requests) are not limited.
"""

from __future__ import annotations

import logging

import trio

from p2pimage.swarm.ratelimit import RateLimiter

__all__ = ["ThrottleProxy"]

log = logging.getLogger("p2pimage.throttle")

# Relay granularity: one receive, one token-bucket reservation and one send per chunk.
# 256 KiB, not 64: the relay's CPU (this process's, in the local cluster) is per chunk,
# and readers stay interleaved fairly, in arrival order, by the bucket's debt.
CHUNK = 256 * 1024
# The bucket's burst: the cap's short-term overshoot, as before the chunk grew.
BURST = 128 * 1024


class ThrottleProxy:
    """Relays ``127.0.0.1:<port>`` to ``upstream`` with ``rate`` bytes/s downstream."""

    def __init__(self, upstream: tuple[str, int], rate: float | None, host: str = "127.0.0.1"):
        self.upstream = upstream
        self.limiter = RateLimiter(rate, burst=BURST if rate else None)
        self.host = host
        self.port = 0
        self.bytes_down = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.upstream)
        except OSError as exc:
            log.warning("upstream %s unreachable: %s", self.upstream, exc)
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, limit: bool) -> None:
                try:
                    while data := await src.receive_some(CHUNK):
                        if limit:
                            await self.limiter.acquire(len(data))
                            self.bytes_down += len(data)
                        await dst.send_all(data)
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()
                    return
                if limit:  # the registry finished answering: the connection is done
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, False)
            nursery.start_soon(pump, upstream, client, True)
