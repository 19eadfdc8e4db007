"""Serving layer blobs to a container runtime: cache, swarm, or registry, never a failed pull.

:class:`LayerService` is what the node's registry mirror calls for a blob ``GET``. It
serves one *swarm registry*, the registry the cluster's sidecar indexes (its base URL,
``registry``): only blobs of that registry are cached and shared through swarms, and
every swarm, cache entry and torrent lookup is keyed by (registry, digest). Blobs of any
other registry the caller names are read from that registry directly, byte for byte
(isolation by registry, not by digest: docs/operations.md, "Trust model").

A node serving several swarm registries runs one service per registry over the same
:class:`~p2pimage.swarm.node.PeerNode` and shared :class:`LayerStats`. The same digest in
two registries has the same torrent, hence the same info-hash; a service given a
``swarm_salt`` (the registry's name) appends it to the torrent's name (``<hex>@<salt>``),
which changes the info-hash every node computes for that registry's swarm: the tracker
(which keys swarms by cluster and info-hash) and the peer handshake (which names the
info-hash) then never put two registries' swarms of one digest together.

1. **Access check** (private-image isolation): an authorized ``HEAD`` of the blob at the
   registry the blob will be served for, with the client's own ``Authorization``;
   anything but 200 is relayed to the client as the registry said it, and no swarm or
   cache byte is served. Successes are cached for :data:`ACCESS_CACHE_S` per
   (credential, registry, repository, digest).
2. **Cache**: a complete, verified blob of the swarm registry on disk is served from disk.
3. **Swarm**: blobs of the swarm registry above a size threshold come through the swarm
   (torrent from the sidecar, peers from the tracker), streamed in order while later
   pieces still download. The swarm's store checks every piece against the torrent and
   then the whole blob against its SHA-256; a whole read holds its last chunk back until
   that check has passed, so a blob that fails it never reaches its client whole.
   Bytes read from the registry for a whole blob (a direct read, or a fallback before
   the swarm served any) are hashed here.
4. **Fallback**: when the sidecar, tracker or swarm cannot serve (unreachable, cache full,
   no progress for ``stall_timeout_s``), the rest of the blob is read directly from the
   registry with the client's credentials, from the byte the client has reached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from p2pimage.errors import DigestMismatchError, LocalProtocolError, P2PImageError, StorageError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.registry import ByteRange, open_blob_range
from p2pimage.sidecar.client import SidecarClient, SidecarError
from p2pimage.storage.cache import BlobCache, blob_key, registry_namespace
from p2pimage.swarm.engine import Swarm, SwarmStalled
from p2pimage.swarm.node import PeerNode
from p2pimage.swarm.origin import OriginCredentials
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.tracker.client import TrackerClient

__all__ = ["ACCESS_CACHE_S", "AccessAnswer", "LayerService", "LayerSettings", "LayerStats"]

log = logging.getLogger("p2pimage.mirror.blobs")

# Bytes per chunk handed to the HTTP layer (and read from disk or the registry).
CHUNK = 1024 * 1024
# How long a successful access check stands for one (credential, registry, repository,
# digest). A runtime pulling a layer sends one HEAD and one or more (Range) GETs within
# seconds, so 30 s spares the registry a HEAD per GET; it is also the longest a revoked
# pull right (or a deleted blob) keeps being honoured by this node, shorter than the
# registry tokens a client already holds (minutes: Docker Hub's last 300 s). Refusals
# are never cached: a client that gains rights is served on its next request.
ACCESS_CACHE_S: Final = 30.0
# Cached access answers kept at most; beyond that the cache is emptied, not grown
# (rebuilding costs one HEAD per pull in flight).
ACCESS_CACHE_MAX: Final = 10_000
# Repositories remembered per blob for the deletion check. A layer shared by more
# repositories may be dropped while an unremembered one still has it: that costs one
# more fetch of it, never a wrong byte.
_REPOSITORIES_PER_BLOB: Final = 16
# Response headers worth relaying from a refused upstream answer (the token challenge).
_RELAY_HEADERS = ("www-authenticate", "docker-distribution-api-version", "content-type")


@dataclass
class LayerSettings:
    # Blobs smaller than this (configs, tiny layers) pass straight through: a swarm costs
    # a torrent fetch and an announce, more than the bytes are worth.
    swarm_threshold_bytes: int = 1024 * 1024
    # No new byte from the swarm for this long: read the rest from the registry.
    stall_timeout_s: float = 15.0
    # Getting a swarm going (torrent + storage) may take this long before we fall back.
    setup_timeout_s: float = 10.0
    # How long a successful access check stands (see ACCESS_CACHE_S).
    access_cache_s: float = ACCESS_CACHE_S


@dataclass
class LayerStats:
    bytes_served: Counter[str] = field(default_factory=Counter)  # cache, swarm, registry
    pulls: Counter[str] = field(default_factory=Counter)  # result
    fallbacks: Counter[str] = field(default_factory=Counter)  # reason
    # Swarm byte counts (SwarmStats field -> bytes) of swarms already closed.
    closed_swarms: Counter[str] = field(default_factory=Counter)


_SWARM_BYTES: Final = ("downloaded_from_peers", "downloaded_from_origin", "uploaded", "wasted")


@dataclass(frozen=True)
class AccessAnswer:
    status: int
    headers: dict[str, str]
    size: int | None
    body: bytes = b""


class LayerService:
    """Blob reads for the mirror, owning the node's swarms for the layers of ``registry``
    (the base URL of the registry the cluster's sidecar indexes, as this node reads it)."""

    def __init__(
        self,
        *,
        registry: str,
        node: PeerNode | None,
        cache: BlobCache,
        http: httpx.AsyncClient,
        sidecar: SidecarClient | None,
        tracker: TrackerClient | None,
        settings: LayerSettings | None = None,
        origin_limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
        swarm_salt: str | None = None,
        stats: LayerStats | None = None,
    ) -> None:
        """``swarm_salt`` keeps this registry's swarms apart from other registries'
        swarms of the same digest (module docstring); ``stats`` may be shared by the
        services of one node."""
        self.registry = registry.rstrip("/")
        self.namespace = registry_namespace(self.registry)
        self.node = node
        self.cache = cache
        self.http = http
        self.sidecar = sidecar
        self.tracker = tracker
        self.settings = settings or LayerSettings()
        self.origin_limiter = origin_limiter
        self.clock = clock
        self.swarm_salt = swarm_salt
        self.stats = stats if stats is not None else LayerStats()
        self._access: dict[tuple[str, str, str, str], tuple[float, AccessAnswer]] = {}
        self._starting: dict[tuple[str, str], trio.Event] = {}  # (registry, digest)
        # Repositories this node fetched or served each blob for, by cache key: a 404
        # from all of them drops the blob (_repository_lost).
        self._repositories: dict[str, set[str]] = {}
        # What each live swarm's origin reads send, by cache key (refreshed by read()).
        self._origin_credentials: dict[str, OriginCredentials] = {}
        self._nursery: trio.Nursery | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the watcher tasks of swarms; resume seeding cached blobs. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.resume_seeding()
            await trio.sleep_forever()

    async def resume_seeding(self) -> None:
        """A restarted node seeds the complete blobs it kept until the tracker releases them."""
        if self.node is None or self.tracker is None:
            return
        for saved in self.cache.complete_with_torrents(self.namespace):
            meta = self._swarm_metainfo(saved)
            if meta.info_hash in self.node.swarms:
                continue
            try:
                await self._start_swarm(meta, repository=None, authorization=None)
            except (StorageError, P2PImageError) as exc:
                log.warning("cannot resume seeding %s: %s", meta.sha256, exc)

    # --- access -------------------------------------------------------------------------

    async def check_access(
        self, upstream: str, repository: str, digest: str, authorization: str | None
    ) -> AccessAnswer:
        """HEAD the blob at ``upstream`` (the registry it will be served for) as the
        client; cache successes for ``access_cache_s``."""
        upstream = upstream.rstrip("/")
        cred = hashlib.sha256((authorization or "").encode()).hexdigest()
        key = (cred, upstream, repository, digest)
        now = self.clock()
        cached = self._access.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        headers = _authorization_headers(authorization)
        url = f"{upstream}/v2/{repository}/blobs/{digest}"
        try:
            response = await self.http.head(url, headers=headers, follow_redirects=True)
        except httpx.HTTPError as exc:
            return AccessAnswer(502, {}, None, f"registry unreachable: {exc}".encode())
        if response.status_code == 404 and upstream == self.registry:
            self._repository_lost(repository, digest)
        relay = {k: v for k, v in response.headers.items() if k.lower() in _RELAY_HEADERS}
        size: int | None = None
        if response.status_code == 200:
            try:
                size = int(response.headers.get("content-length", ""))
            except ValueError:
                size = None
        answer = AccessAnswer(response.status_code, relay, size)
        if response.status_code == 200 and size is not None:
            if len(self._access) >= ACCESS_CACHE_MAX:
                self._access.clear()
            self._access[key] = (now + self.settings.access_cache_s, answer)
        return answer

    def origin_credentials(self, digest: str) -> OriginCredentials | None:
        """What the origin reads of ``digest``'s live swarm send (None: no swarm)."""
        try:
            return self._origin_credentials.get(
                blob_key(self.namespace, digest.removeprefix("sha256:"))
            )
        except LocalProtocolError:
            return None

    def _note_repository(self, hex_: str, repository: str | None) -> None:
        if repository is None:
            return
        if hex_ not in self._repositories and len(self._repositories) >= ACCESS_CACHE_MAX:
            self._repositories.clear()  # forgetting only delays a drop to the next 404
        known = self._repositories.setdefault(hex_, set())
        if len(known) < _REPOSITORIES_PER_BLOB:
            known.add(repository)

    def _repository_lost(self, repository: str, digest: str) -> None:
        """The swarm registry answered 404 for ``repository@digest``. Only a repository
        this node fetched or served the blob for counts (a client naming some other
        repository must not evict what the cluster uses); once no such repository has
        it any more, the blob is dropped (:meth:`registry_lost`)."""
        try:
            hex_ = blob_key(self.namespace, digest.removeprefix("sha256:"))
        except LocalProtocolError:
            return
        known = self._repositories.get(hex_)
        if known is None or repository not in known:
            return
        known.discard(repository)
        if not known:
            del self._repositories[hex_]
            self.registry_lost(digest)

    def registry_lost(self, digest: str) -> bool:
        """The swarm registry answered 404 for ``digest`` (deleted there, or never
        pushed): close its swarm, so this node stops serving it to peers, drop every
        cached access answer for it, and drop it from the cache (at once, or when the
        last reader in flight lets go). Returns whether there was anything to drop."""
        try:
            hex_ = blob_key(self.namespace, digest.removeprefix("sha256:"))
        except LocalProtocolError:
            return False
        dropped = False
        if self.node is not None:
            for swarm in self._own_swarms(digest):
                self.node.remove_swarm(swarm.info_hash)
                dropped = True
        for key in [k for k in self._access if k[1] == self.registry and k[3] == digest]:
            del self._access[key]
        if self.cache.discard(hex_):
            dropped = True
        if dropped:
            log.info("the registry no longer has %s: swarm closed, cache entry dropped", digest)
        return dropped

    # --- reading ------------------------------------------------------------------------

    async def read(
        self,
        upstream: str,
        repository: str,
        digest: str,
        size: int,
        authorization: str | None,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Yield bytes ``[start, end)`` of the blob as ``upstream`` holds it; the caller
        has checked access at ``upstream``. Cache and swarm serve only when ``upstream``
        is this service's swarm registry."""
        end = size if end is None else end
        upstream = upstream.rstrip("/")
        shared = upstream == self.registry  # cache and swarm only for the swarm registry
        hex_ = blob_key(self.namespace, digest.removeprefix("sha256:"))
        whole = start == 0 and end == size
        position = start
        source = "registry"
        if shared:
            self._note_repository(hex_, repository)
        if shared and (credentials := self._origin_credentials.get(hex_)) is not None:
            # The caller passed the access check with these: the swarm's origin reads
            # use the most recent authorised client's credentials from now on.
            credentials.offer(repository, _authorization_headers(authorization))
        try:
            if shared and self.cache.is_complete(hex_):
                source = "cache"
                self.stats.pulls["cache"] += 1
                async for chunk in self._read_file(self.cache.blob_path(hex_), start, end, hex_):
                    position += len(chunk)
                    self.stats.bytes_served["cache"] += len(chunk)
                    yield chunk
                return
            swarm: Swarm | None = None
            if shared and size >= self.settings.swarm_threshold_bytes:
                swarm = await self._swarm_or_none(repository, digest, size, authorization)
            if swarm is not None:
                source = "swarm"
                # The store checks what the swarm serves: every piece against the
                # torrent, the whole blob against its SHA-256 once complete. A whole read
                # holds its last chunk back until that check has passed; hashing here
                # again would cost a second SHA-256 of every byte (docs/benchmarks.md).
                self.cache.pin(hex_)
                try:
                    stream = swarm.stream(
                        start, end, CHUNK, stall_timeout_s=self.settings.stall_timeout_s
                    )
                    held: bytes | None = None
                    async with aclosing(stream) as chunks:
                        async for chunk in chunks:
                            if whole and position + len(chunk) == end:
                                held = chunk  # the stream ends after it
                                continue
                            position += len(chunk)
                            self.stats.bytes_served["swarm"] += len(chunk)
                            yield chunk
                    if held is not None:
                        await self._verified(swarm, digest)
                        position += len(held)
                        self.stats.bytes_served["swarm"] += len(held)
                        yield held
                except SwarmStalled:
                    self._fallback("stalled", digest, position)
                except DigestMismatchError:
                    if position > start:  # the client has bytes of a blob that failed
                        self.stats.pulls["digest_mismatch"] += 1
                        raise
                    self._fallback("DigestMismatchError", digest, position)
                except (StorageError, LocalProtocolError) as exc:
                    if position < end:
                        self._fallback(type(exc).__name__, digest, position)
                finally:
                    self.cache.unpin(hex_)
            elif shared and size >= self.settings.swarm_threshold_bytes:
                source = "fallback"
            # The registry's bytes of a whole blob are checked here, before its last
            # chunk goes out: a direct read, or a fallback before the swarm served any.
            hasher = hashlib.sha256() if whole and position == start else None
            if position < end:
                async for chunk in self._read_registry(
                    upstream, repository, digest, authorization, position, end
                ):
                    if hasher is not None:
                        hasher.update(chunk)
                        if position + len(chunk) >= end:  # checked before the last byte
                            self._check_digest(hasher, digest)
                    position += len(chunk)
                    self.stats.bytes_served["registry"] += len(chunk)
                    yield chunk
                if source == "swarm":
                    source = "fallback"
            if hasher is not None:
                self._check_digest(hasher, digest)
            self.stats.pulls[source if source != "registry" else "direct"] += 1
        except BaseException:
            if position < end:
                self.stats.pulls["error"] += 1
            raise

    def _check_digest(self, hasher: hashlib._Hash, digest: str) -> None:
        if "sha256:" + hasher.hexdigest() != digest:
            self.stats.pulls["digest_mismatch"] += 1
            raise DigestMismatchError(f"blob {digest} did not match its digest")

    async def _verified(self, swarm: Swarm, digest: str) -> None:
        """Return once ``swarm``'s store has checked the whole blob against its digest;
        raise :class:`DigestMismatchError` when the swarm closes without that (the check
        failed, or the swarm ended first). A check that takes longer than
        ``stall_timeout_s`` is logged and not waited for: every piece has matched the
        torrent, and the runtime checks the digest itself."""
        with trio.move_on_after(self.settings.stall_timeout_s):
            async with trio.open_nursery() as nursery:

                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, swarm.complete)
                nursery.start_soon(until, swarm.closed)
        if swarm.complete.is_set():
            return
        if swarm.closed.is_set():
            raise DigestMismatchError(f"blob {digest} was not verified against its digest")
        log.warning("%s: whole-blob check still running; last chunk sent unchecked", digest)

    def _fallback(self, reason: str, digest: str, position: int) -> None:
        self.stats.fallbacks[reason] += 1
        log.warning("falling back to the registry for %s at byte %d: %s", digest, position, reason)

    async def _read_file(self, path: Path, start: int, end: int, hex_: str) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of a cached blob, :data:`CHUNK` at a time. A chunk
        already in the page cache is read at once (a copy); only one that would wait
        for the disk goes through a worker thread (a thread hop costs about as much CPU
        as the copy of a MiB: docs/benchmarks.md, "The mirror's stream to the runtime")."""
        self.cache.pin(hex_)
        self.cache.touch(hex_, self.clock())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.cache.unpin(hex_)
            raise StorageError(f"cannot open cached blob {path}: {exc.strerror}") from None
        try:
            position = start
            while position < end:
                size = min(CHUNK, end - position)
                try:
                    if _in_page_cache(fd, position, size):
                        data = os.pread(fd, size, position)
                        await trio.lowlevel.checkpoint()
                    else:
                        data = await trio.to_thread.run_sync(os.pread, fd, size, position)
                except OSError as exc:
                    raise StorageError(f"cannot read cached blob {path}: {exc.strerror}") from None
                if not data:
                    raise StorageError(f"cached blob {path} is shorter than expected")
                position += len(data)
                yield data
        finally:
            os.close(fd)
            self.cache.unpin(hex_)

    async def _read_registry(
        self,
        upstream: str,
        repository: str,
        digest: str,
        authorization: str | None,
        start: int,
        end: int,
    ) -> AsyncIterator[bytes]:
        headers = _authorization_headers(authorization)
        url = f"{upstream}/v2/{repository}/blobs/{digest}"
        async with open_blob_range(
            self.http,
            url,
            ByteRange(start, end),
            headers=headers,
            skip_ignored=True,
            chunk_size=CHUNK,
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # --- swarms -------------------------------------------------------------------------

    async def _swarm_or_none(
        self, repository: str, digest: str, size: int, authorization: str | None
    ) -> Swarm | None:
        if self.node is None or self.sidecar is None or self.tracker is None:
            self._fallback("p2p_disabled", digest, 0)
            return None
        try:
            with trio.fail_after(self.settings.setup_timeout_s):
                return await self._swarm_for(repository, digest, size, authorization)
        except trio.TooSlowError:
            self._fallback("setup_timeout", digest, 0)
        except SidecarError as exc:
            self._fallback("sidecar", digest, 0)
            log.info("sidecar could not serve %s: %s", digest, exc)
        except _CacheFull:
            self._fallback("cache_full", digest, 0)
        except StorageError as exc:
            self._fallback("storage", digest, 0)
            log.error("storage: %s", exc)
        return None

    async def _swarm_for(
        self, repository: str, digest: str, size: int, authorization: str | None
    ) -> Swarm:
        assert self.node is not None and self.sidecar is not None
        hex_ = blob_key(self.namespace, digest.removeprefix("sha256:"))
        flight = (self.registry, digest)
        while flight in self._starting:  # single flight: one torrent fetch per blob
            await self._starting[flight].wait()
        for swarm in self._own_swarms(digest):
            if not swarm.closed.is_set():
                return swarm
        done = self._starting[flight] = trio.Event()
        try:
            meta = self._swarm_metainfo(await self.sidecar.torrent(digest, repository))
            if meta.length != size:
                raise SidecarError(f"torrent says {meta.length} bytes, registry says {size}")
            if not self.cache.reserve(hex_, size, self.clock()):
                raise _CacheFull(digest)
            self.cache.save_torrent(meta, self.namespace)
            return await self._start_swarm(meta, repository, authorization)
        finally:
            del self._starting[flight]
            done.set()

    async def _start_swarm(
        self, meta: Metainfo, repository: str | None, authorization: str | None
    ) -> Swarm:
        assert self.node is not None
        hex_ = blob_key(self.namespace, meta.digest_hex)
        # A salted registry is one of several: the tracker's origin URLs name its own
        # registry_url, so they are read from this registry at the same blob path.
        credentials = OriginCredentials(
            self.registry,
            repository,
            _authorization_headers(authorization),
            rebase=self.swarm_salt is not None,
        )
        swarm = await self.node.add_swarm(
            meta,
            self.cache.directory(self.namespace),
            tracker=self.tracker,
            repository=repository,
            origin_credentials=credentials,
            origin_limiter=self.origin_limiter,
            origin_http=self.http,  # the registry's client, not the control plane's
        )
        self._origin_credentials[hex_] = credentials
        self.cache.pin(hex_)
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, swarm, hex_)
        return swarm

    async def _watch(self, swarm: Swarm, hex_: str) -> None:
        credentials = self._origin_credentials.get(hex_)
        try:
            async with trio.open_nursery() as nursery:

                async def on_complete() -> None:
                    await swarm.complete.wait()
                    self.cache.mark_complete(hex_, swarm.metainfo.length, self.clock())

                nursery.start_soon(on_complete)
                await swarm.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            for name in _SWARM_BYTES:
                self.stats.closed_swarms[name] += getattr(swarm.stats, name)
            if self._origin_credentials.get(hex_) is credentials:
                del self._origin_credentials[hex_]
            self.cache.unpin(hex_)

    def _swarm_metainfo(self, meta: Metainfo) -> Metainfo:
        """The torrent as this registry's swarm runs it: renamed ``<name>@<salt>`` (a
        different info-hash, the same pieces) when the service has a salt."""
        if self.swarm_salt is None or meta.name.endswith("@" + self.swarm_salt):
            return meta
        return dataclasses.replace(meta, name=f"{meta.name}@{self.swarm_salt}")

    def _own_swarms(self, digest: str) -> list[Swarm]:
        """The peer's swarms of ``digest`` that are this registry's (never another's):
        named ``…@<salt>`` for a salted service, with no ``@`` (the sidecar's name)
        otherwise."""
        if self.node is None:
            return []
        suffix = None if self.swarm_salt is None else "@" + self.swarm_salt
        return [
            swarm
            for swarm in list(self.node.swarms.values())
            if swarm.metainfo.sha256 == digest
            and (
                "@" not in swarm.metainfo.name
                if suffix is None
                else swarm.metainfo.name.endswith(suffix)
            )
        ]

    def _swarm_bytes(self, name: str) -> int:
        live = sum(getattr(s.stats, name) for s in self.node.swarms.values()) if self.node else 0
        return int(self.stats.closed_swarms[name] + live)

    def peer_bytes(self) -> int:
        """Layer bytes downloaded from peers, over this service's life."""
        return self._swarm_bytes("downloaded_from_peers")

    def origin_bytes(self) -> int:
        """Layer bytes this node read from the registry as a tracker-named origin."""
        return self._swarm_bytes("downloaded_from_origin")

    def uploaded_bytes(self) -> int:
        """Layer bytes uploaded to peers."""
        return self._swarm_bytes("uploaded")

    def wasted_bytes(self) -> int:
        """Layer bytes received from peers and thrown away (blocks cancelled, timed out
        and asked again, or of a piece already verified)."""
        return self._swarm_bytes("wasted")


class _CacheFull(P2PImageError):
    pass


_PROBE = bytearray(1)


def _in_page_cache(fd: int, offset: int, size: int) -> bool:
    """Whether the first and the last byte of ``[offset, offset + size)`` of ``fd`` are
    in the page cache: a one-byte ``RWF_NOWAIT`` read of each succeeds without waiting
    for the disk. Readahead fills the pages between, so a read of the range then costs a
    copy, not a disk wait. False where the kernel or file system cannot tell."""
    try:
        return (
            os.preadv(fd, [_PROBE], offset, os.RWF_NOWAIT) == 1
            and os.preadv(fd, [_PROBE], offset + size - 1, os.RWF_NOWAIT) == 1
        )
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here
        return False


def _authorization_headers(authorization: str | None) -> dict[str, str]:
    return {"Authorization": authorization} if authorization else {}
