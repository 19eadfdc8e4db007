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
import re
import urllib.parse
from collections.abc import Mapping
from typing import Protocol

import httpx
import trio

from p2pimage.errors import PieceHashError, RemoteProtocolError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.registry import ByteRange, RegistryError, open_blob_range
from p2pimage.swarm.policy import OriginRange
from p2pimage.swarm.ratelimit import RateLimiter

__all__ = ["OriginCredentials", "OriginError", "OriginReader", "OriginSwarm", "same_registry"]

log = logging.getLogger("p2pimage.swarm.origin")

# One HTTP request covers up to this many bytes of consecutive missing pieces: long enough
# that request overhead vanishes, short enough that a steal or a failure wastes little.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Read granularity from the response body (and the limiter's unit), at most: on a
# capped downlink, less (OriginSwarm.origin_read_size).
CHUNK_BYTES = 256 * 1024


class OriginError(RemoteProtocolError):
    """The registry could not serve the range (status, short body, bad bytes)."""


# How long a reader whose credentials the registry refused (401/403) waits for a client
# pull to bring fresher ones before it hands its range back to the peers. A runtime
# pulling the layer asks again within seconds (each Range GET passes the access check).
REFRESH_WAIT_S = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443}
# The blob part of an origin URL: what a rebased read keeps (OriginCredentials.read_url).
_BLOB_PATH = re.compile(r"/v2/[a-z0-9._/-]+/blobs/sha256:[0-9a-f]{64}$")


def _origin_of(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def same_registry(url: str, registry: str) -> bool:
    """Whether ``url`` is a blob URL on ``registry`` (a base URL): same scheme, host and
    port, under its ``/v2/``. Origin reads go nowhere else."""
    origin, base = _origin_of(url), _origin_of(registry)
    if origin is None or origin != base:
        return False
    prefix = urllib.parse.urlsplit(registry).path.rstrip("/") + "/v2/"
    return urllib.parse.urlsplit(url).path.startswith(prefix)


class OriginCredentials:
    """The registry credentials a swarm's origin reads send, and the one registry they
    may go to.

    ``registry`` is the base URL of the registry the node is configured for: a reader
    refuses an origin URL the tracker names anywhere else (a hostile tracker must not
    collect client credentials). The mirror :meth:`offer` s the headers of every client
    request it authorised for this blob and ``repository``, so the readers always send
    the most recent authorised client's; when the registry refuses them (401/403) a
    reader calls :meth:`refused` and waits for fresher ones (:meth:`wait_renewed`).

    With ``rebase`` (a registry the tracker's ``registry_url`` is not, on a node serving
    several), a blob URL elsewhere is read from ``registry`` at the same
    ``/v2/<repository>/blobs/<digest>`` path instead of being refused: the tracker still
    names the range, and the bytes still come only from the node's own registry.
    """

    def __init__(
        self,
        registry: str,
        repository: str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        refresh_wait_s: float = REFRESH_WAIT_S,
        rebase: bool = False,
    ) -> None:
        self.registry = registry.rstrip("/")
        self.rebase = rebase
        self.refresh_wait_s = refresh_wait_s
        self.repository = repository
        self._headers = dict(headers or {})
        self._generation = 0
        self._renewed = trio.Event()

    def allows(self, url: str) -> bool:
        return same_registry(url, self.registry)

    def read_url(self, url: str) -> str | None:
        """Where a reader told to read ``url`` reads: ``url`` itself on this registry,
        the same blob path on it with ``rebase``, else nowhere (None)."""
        if self.allows(url):
            return url
        if self.rebase:
            blob = _BLOB_PATH.search(urllib.parse.urlsplit(url).path)
            if blob is not None:
                return self.registry + blob.group(0)
        return None

    def current(self) -> tuple[int, dict[str, str]]:
        """The headers to send now, and their generation (for :meth:`refused`)."""
        return self._generation, dict(self._headers)

    def offer(self, repository: str, headers: Mapping[str, str]) -> None:
        """A client request for this blob in ``repository`` passed the access check
        with ``headers``: use them from now on (only for the swarm's own repository,
        which the origin URL names: a registry token is scoped to one)."""
        if self.repository is not None and repository != self.repository:
            return
        fresh = dict(headers)
        if fresh == self._headers:
            return
        self._headers = fresh
        self._generation += 1
        self._renewed.set()
        self._renewed = trio.Event()

    def refused(self, generation: int) -> None:
        """The registry refused the headers of ``generation``: never send them again
        (unless a client brings them again through a passed access check)."""
        if generation == self._generation and self._headers:
            self._headers = {}
            self._generation += 1

    async def wait_renewed(self, generation: int) -> bool:
        """Wait up to ``refresh_wait_s`` for headers newer than ``generation``."""
        with trio.move_on_after(self.refresh_wait_s):
            while self._generation <= generation or not self._headers:
                await self._renewed.wait()
            return True
        return False


class OriginSwarm(Protocol):
    """All an origin reader asks of its swarm (:class:`~p2pimage.swarm.engine.Swarm`)."""

    @property
    def metainfo(self) -> Metainfo: ...

    def has_piece(self, index: int) -> bool: ...

    def held_by_peer(self, index: int) -> bool: ...

    def reserve_for_origin(self, first: int, end: int) -> None: ...

    def return_to_peers(self, first: int, end: int) -> None: ...

    async def pace_download(self, nbytes: int) -> None: ...

    def origin_read_size(self, largest: int) -> int: ...

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
        credentials: OriginCredentials | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        """Without ``credentials`` the reader sends none (a public registry); with them
        it reads only if ``url`` is on their registry."""
        self.swarm = swarm
        self.url = url  # as the tracker named it
        self._read_url = url  # where it is read (OriginCredentials.read_url)
        self.range = OriginRange(first, end)  # what to read, where to stop, when to renew
        self.client = client
        self.credentials = credentials
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
        credentials = self.credentials
        read_url = self.url if credentials is None else credentials.read_url(self.url)
        if credentials is not None and read_url is None:
            # Never a byte, nor a credential, to a host the node is not configured for.
            self.failed = f"origin URL not on the configured registry {credentials.registry}"
            log.warning("refusing origin read of %s: %s", self.url, self.failed)
            self.finished.set()
            return
        self._read_url = read_url or self.url
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
                generation, headers = (
                    self.credentials.current() if self.credentials is not None else (0, {})
                )
                try:
                    await self._read_run(*step.read, headers)
                except RegistryError as exc:
                    if exc.status not in (401, 403) or self.credentials is None:
                        raise
                    # Expired or revoked: never again; read on with a later client's.
                    self.credentials.refused(generation)
                    log.info("origin credentials for %s refused (%d)", self.url, exc.status)
                    if not await self.credentials.wait_renewed(generation):
                        raise
        except (OriginError, RegistryError, httpx.HTTPError, PieceHashError, OSError) as exc:
            self.failed = str(exc) or type(exc).__name__
            log.warning(
                "origin read of %s failed at piece %d: %s", self.url, self.next_index, self.failed
            )
        finally:
            # Whatever we did not read goes back to the peers.
            self.shrink(self.next_index)
            self.finished.set()

    async def _read_run(self, start: int, stop: int, headers: Mapping[str, str]) -> None:
        mi = self.swarm.metainfo
        byte_range = ByteRange(
            mi.piece_offset(start), mi.piece_offset(stop - 1) + mi.piece_size(stop - 1)
        )
        # A registry that ignores Range is fine only from byte 0 (skip_ignored=False):
        # reading and dropping a prefix would cost the registry another copy of it.
        async with open_blob_range(
            self.client,
            self._read_url,
            byte_range,
            headers=headers,
            chunk_size=self.swarm.origin_read_size(CHUNK_BYTES),
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
