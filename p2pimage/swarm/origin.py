"""Origin range reads: fetch an assigned range of pieces from the registry.

The tracker names a few peers of a swarm as *origin fetchers* and gives each a disjoint
piece range; together the ranges cover the layer once, so the registry sends about one
copy per cluster. An :class:`OriginReader` reads its range with HTTP ``Range`` requests,
verifies every piece against the torrent, stores it and announces it to the swarm at
once (``have``), so origin data spreads while it still arrives. The tracker may shrink
the range at any time (work stealing): the reader stops at the current end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import httpx
import trio

from p2pimage.errors import PieceHashError, RemoteProtocolError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.registry import ByteRange, RegistryError, open_blob_range
from p2pimage.swarm.policy import OriginRange
from p2pimage.swarm.ratelimit import RateLimiter

__all__ = ["OriginError", "OriginReader", "OriginSwarm"]

log = logging.getLogger("p2pimage.swarm.origin")

# One HTTP request covers up to this many bytes of consecutive missing pieces: long enough
# that request overhead vanishes, short enough that a steal or a failure wastes little.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Read granularity from the response body (and the limiter's unit).
CHUNK_BYTES = 256 * 1024


class OriginError(RemoteProtocolError):
    """The registry could not serve the range (status, short body, bad bytes)."""


class OriginSwarm(Protocol):
    """All an origin reader asks of its swarm (:class:`~p2pimage.swarm.engine.Swarm`)."""

    @property
    def metainfo(self) -> Metainfo: ...

    def has_piece(self, index: int) -> bool: ...

    def held_by_peer(self, index: int) -> bool: ...

    def reserve_for_origin(self, first: int, end: int) -> None: ...

    def return_to_peers(self, first: int, end: int) -> None: ...

    async def pace_download(self, nbytes: int) -> None: ...

    async def accept_origin_piece(
        self, index: int, data: bytes | bytearray | memoryview
    ) -> bool: ...

    def announce_soon(self) -> None: ...


class OriginReader:
    """Reads pieces ``[first, end)`` of one blob from ``url`` into a swarm."""

    def __init__(
        self,
        swarm: OriginSwarm,
        url: str,
        first: int,
        end: int,
        *,
        client: httpx.AsyncClient,
        headers: Mapping[str, str] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.swarm = swarm
        self.url = url
        self.range = OriginRange(first, end)  # what to read, where to stop, when to renew
        self.client = client
        self.headers = dict(headers or {})
        self.limiter = limiter or RateLimiter(None)
        self.pieces_done = 0
        self.bytes_read = 0
        self.failed: str | None = None
        self.finished = trio.Event()

    @property
    def first(self) -> int:
        return self.range.first

    @property
    def end(self) -> int:
        return self.range.end

    @property
    def next_index(self) -> int:
        return self.range.next_index

    def shrink(self, end: int) -> None:
        """The tracker gave ``[end, old end)`` to another fetcher (or we stop at ``end``)."""
        returned = self.range.shrink(end)
        if returned is not None:
            self.swarm.return_to_peers(*returned)

    def extend(self, end: int) -> None:
        """The tracker renewed our lease up to ``end``: read on (if still running)."""
        if not self.finished.is_set():
            added = self.range.extend(end)
            if added is not None:
                self.swarm.reserve_for_origin(*added)

    async def run(self) -> None:
        """Read the range; on failure, hand the unread pieces back to the swarm."""
        swarm = self.swarm
        mi = swarm.metainfo
        swarm.reserve_for_origin(self.range.first, self.range.end)
        try:
            while True:
                step = self.range.next_request(
                    swarm.has_piece, swarm.held_by_peer, mi.piece_size, MAX_REQUEST_BYTES
                )
                if step.give_back is not None:
                    swarm.return_to_peers(*step.give_back)
                if step.read is None:
                    break
                await self._read_run(*step.read)
        except (OriginError, RegistryError, httpx.HTTPError, PieceHashError, OSError) as exc:
            self.failed = str(exc) or type(exc).__name__
            log.warning(
                "origin read of %s failed at piece %d: %s", self.url, self.next_index, self.failed
            )
        finally:
            # Whatever we did not read goes back to the peers.
            self.shrink(self.next_index)
            self.finished.set()

    async def _read_run(self, start: int, stop: int) -> None:
        mi = self.swarm.metainfo
        byte_range = ByteRange(
            mi.piece_offset(start), mi.piece_offset(stop - 1) + mi.piece_size(stop - 1)
        )
        # A registry that ignores Range is fine only from byte 0 (skip_ignored=False):
        # reading and dropping a prefix would cost the registry another copy of it.
        async with open_blob_range(
            self.client, self.url, byte_range, headers=self.headers, chunk_size=CHUNK_BYTES
        ) as chunks:
            index = start
            buffer = bytearray()
            async for chunk in chunks:
                # The registry's egress cap, then this node's own download link.
                await self.limiter.acquire(len(chunk))
                await self.swarm.pace_download(len(chunk))
                self.bytes_read += len(chunk)
                buffer += chunk
                while index < stop and len(buffer) >= mi.piece_size(index):
                    size = mi.piece_size(index)
                    piece = bytes(buffer[:size])
                    del buffer[:size]
                    if not self.range.piece_arrived(
                        index,
                        have=self.swarm.has_piece(index),
                        held_by_peer=self.swarm.held_by_peer(index),
                    ):
                        self.shrink(index)  # stolen while in flight, or a peer has it
                        return
                    await self.swarm.accept_origin_piece(index, piece)
                    self.pieces_done += 1
                    if self.range.advanced(index):
                        self.swarm.announce_soon()  # report progress, renew the lease
                    index += 1
                if index >= stop:
                    break
            if index < stop:
                raise OriginError(f"registry sent a short body (stopped at piece {index})")
