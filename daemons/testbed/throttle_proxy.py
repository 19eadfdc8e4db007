"""A TCP relay with one shared bandwidth cap: the registry's egress link in benchmarks and
in the local cluster demo.

Every byte the upstream (the registry) sends to any client passes one token bucket, so
the cap holds for the registry as a whole, as a real uplink would, and not per reader.
Its readers share the cap as flows share a real link: each gets its part in turn, in
slices of a few tens of milliseconds of the link (:func:`slice_bytes`), never a whole
chunk's worth of the link at a time while few readers share it.
Bytes sent upstream (requests) are not limited.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

import trio

from p2pimage.swarm.ratelimit import RateLimiter

__all__ = ["ThrottleProxy", "slice_bytes"]

log = logging.getLogger("p2pimage.throttle")

# Receive granularity: at most one chunk per receive (or splice into the pipe). The
# relay's CPU (this process's, in the local cluster) is mostly per chunk: 1 MiB, not 256
# or 64 KiB (docs/benchmarks.md, "Where the cluster demo's CPU goes").
CHUNK = 1024 * 1024
# Pacing granularity: a chunk is paid for and sent on in slices of at most SLICE_S of
# the cap (and at least MIN_SLICE bytes), so readers interleave, in arrival order by the
# bucket's debt, slice by slice. Paying a whole 1 MiB chunk at once held each of two
# readers at 2 MiB/s for a second between its chunks; an origin fetcher whose own
# downlink took exactly its half of the registry then idled and never caught up (the
# registry's part of 16 calibration nodes ended at 5.4-5.8 s where its cap allows 4;
# docs/benchmarks.md, "Calibration"). No byte goes on before it is paid for, so the
# cap's overshoot stays the burst.
SLICE_S = 0.02
MIN_SLICE = 16 * 1024
# Slices grow with the readers beyond this many. Each slice is a wake-up of the relay
# (50 a second at SLICE_S): with k readers a reader's turn comes every k slices, so at
# 16 readers (the demo's direct pulls: 8 skopeo clients, 2 layers each) a reader waited
# 320 ms between turns anyway, and the 1,600 wake-ups of 20 ms slices cost the harness
# 0.25-0.45 CPU-s more than 1 MiB chunks (docs/benchmarks.md, "The cluster demo's
# direct pulls"). Up to 2 * FAIR_READERS - 1 readers (the origin fetchers of a 16- or
# 32-node swarm: 2 or 4) the slice stays SLICE_S of the cap.
FAIR_READERS = 4
# The bucket's burst: the cap's short-term overshoot.
BURST = 128 * 1024
# Linux: the registry's bytes go from socket to socket through a pipe in the kernel
# (splice), never copied into Python (8 skopeo readers, 64 MiB at 8 MiB/s: relay CPU
# 0.24-0.28 s reading 1 MiB chunks into Python, 0.19-0.20 s spliced).
SPLICE = hasattr(os, "splice")


def slice_bytes(rate: float | None, readers: int) -> int:
    """Bytes paid for and sent on at a time while ``readers`` readers share ``rate``
    (bytes/s; None: uncapped, whole chunks): :data:`SLICE_S` of the cap (at least
    :data:`MIN_SLICE`), times ``readers // FAIR_READERS`` from ``2 * FAIR_READERS``
    readers on, at most :data:`CHUNK`."""
    if rate is None:
        return CHUNK
    base = max(MIN_SLICE, int(rate * SLICE_S))
    return min(CHUNK, base * max(1, readers // FAIR_READERS))


class ThrottleProxy:
    """Relays ``127.0.0.1:<port>`` to ``upstream`` with ``rate`` bytes/s downstream."""

    def __init__(self, upstream: tuple[str, int], rate: float | None, host: str = "127.0.0.1"):
        self.upstream = upstream
        self.limiter = RateLimiter(rate, burst=BURST if rate else None)
        self.rate = rate
        self.readers = 0  # connections with registry bytes waiting to be paid and sent
        self.host = host
        self.port = 0
        self.bytes_down = 0

    @property
    def slice(self) -> int:
        """Bytes paid for and sent on at a time now (:func:`slice_bytes`)."""
        return slice_bytes(self.rate, self.readers)

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
                    if limit and SPLICE:
                        await self._splice(src, dst)
                    else:
                        while data := await src.receive_some(CHUNK):
                            if not limit:
                                await dst.send_all(data)
                                continue
                            view = memoryview(data)
                            at = 0
                            self.readers += 1
                            try:
                                while at < len(view):
                                    part = view[at : at + self.slice]
                                    at += len(part)
                                    await self.limiter.acquire(len(part))
                                    self.bytes_down += len(part)
                                    await dst.send_all(part)
                            finally:
                                self.readers -= 1
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()
                    return
                if limit:  # the registry finished answering: the connection is done
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, False)
            nursery.start_soon(pump, upstream, client, True)

    async def _splice(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        """Relay ``src`` to ``dst`` through a pipe in the kernel (``splice``), a chunk
        at a time, each slice of it paid for before it goes on."""
        s_in, s_out = src.socket, dst.socket
        fd_in, fd_out = s_in.fileno(), s_out.fileno()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # above pipe-max-size: the default (64 KiB)
                fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, CHUNK)
            while True:
                try:
                    n = os.splice(fd_in, pipe_w, CHUNK, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(s_in)
                    continue
                if n == 0:
                    return
                self.readers += 1
                try:
                    while n:
                        part = min(n, self.slice)
                        await self.limiter.acquire(part)
                        self.bytes_down += part
                        n -= part
                        while part:
                            try:
                                part -= os.splice(pipe_r, fd_out, part, flags=flags)
                            except BlockingIOError:
                                await trio.lowlevel.wait_writable(s_out)
                finally:
                    self.readers -= 1
                await trio.lowlevel.checkpoint()
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
