"""A TCP relay to the first live one of several backends: a Kubernetes Service in front
of replicas (two trackers on one Redis), for the fault matrix.

Each new connection goes to the backends in turn (round robin) and skips one that refuses
the connection, as kube-proxy does once a dead pod's endpoint is gone.
"""

from __future__ import annotations

import logging

import trio

__all__ = ["ServiceProxy"]

log = logging.getLogger("p2pimage.service")

CHUNK = 64 * 1024


class ServiceProxy:
    """Relays ``host:<port>`` to one of ``backends`` per connection."""

    def __init__(self, backends: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
        if not backends:
            raise ValueError("a service needs at least one backend")
        self.backends = backends
        self.host = host
        self.port = 0
        self._next = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _connect(self) -> trio.SocketStream | None:
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                return await trio.open_tcp_stream(*backend)
            except OSError as exc:
                log.info("backend %s refused: %s", backend, exc)
        return None

    async def _relay(self, client: trio.SocketStream) -> None:
        upstream = await self._connect()
        if upstream is None:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    while data := await src.receive_some(CHUNK):
                        await dst.send_all(data)
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
