"""The sidecar's library half: a torrent per blob, generated once, stored content-addressed.

- :class:`TorrentStore`: ``<dir>/<hex>.torrent``, written through a temporary file, fsync
  and ``os.replace``, so a crash never leaves a half-written torrent under a served name;
  a file that does not parse or does not match its name is treated as absent.
- :func:`generate_metainfo`: streams a blob from the registry exactly once, computing piece
  SHA-1s and the blob's SHA-256 in the same pass, off the event loop (one worker thread
  reads the socket straight into a pool of buffers and computes the SHA-256, a second
  computes the piece SHA-1s), and checks the SHA-256 against the digest
  (:class:`~p2pimage.errors.DigestMismatchError`: no torrent).
- :class:`Indexer`: what to index and when. Manifest pushes (from the webhook or a catalog
  backfill) go through a bounded queue to manifest workers, which expand indexes into
  their platform manifests and queue every config and layer blob not yet indexed to blob
  workers. On-demand requests and queued work share one generation per digest (single
  flight). Registry failures are retried with capped exponential backoff: nothing is lost
  while the registry is down.

Naming: a torrent's ``name`` is the blob digest's 64 hex characters, so the same blob
always gives the same info-hash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import trio

from p2pimage.errors import (
    DigestMismatchError,
    LocalProtocolError,
    MetainfoError,
    P2PImageError,
)
from p2pimage.metainfo.torrent import MAX_TORRENT_BYTES, Metainfo, MetainfoBuilder
from p2pimage.oci.notifications import RegistryEvent
from p2pimage.oci.registry import (
    MANIFEST_TYPES,
    BlobReader,
    ManifestError,
    RegistryClient,
    RegistryError,
    check_digest,
    is_digest,
    is_repository,
)

log = logging.getLogger("p2pimage.sidecar.indexer")

#: Size of each read buffer handed between the hashing threads: big enough that thread
#: hand-offs vanish against ~2.5 ms of hashing each (docs/benchmarks.md, "Tuned
#: defaults").
HASH_CHUNK: Final = 4 * 1024 * 1024
#: Repositories recorded per torrent for reconciliation: a blob shared by more is checked
#: in these only (kept while any of them still has it).
MAX_REPOSITORIES_PER_TORRENT: Final = 16
_TMP_PREFIX: Final = ".tmp-"


class BlobUnavailableError(P2PImageError):
    """The blob cannot be indexed (empty blob, size unknown, rejected by the registry)."""


# Store ---------------------------------------------------------------------------------


class TorrentStore:
    """Content-addressed torrents on disk. Thread-safe for distinct digests; writes of the
    same digest are idempotent (same bytes, atomic replace)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._verified: set[str] = set()
        # Leftovers of a crash mid-write: never served, removed now.
        for stale in self.directory.glob(_TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.directory / f"{digest[7:]}.torrent"

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and is_digest(digest) and self.load(digest) is not None

    def load(self, digest: str) -> bytes | None:
        """The stored torrent for ``digest``, or ``None``. A file that does not decode or
        whose ``sha256`` differs from its name is moved aside (``.corrupt``) and ignored."""
        path = self.path(digest)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_TORRENT_BYTES + 1)
        except FileNotFoundError:
            return None
        if digest in self._verified:
            return data
        try:
            if len(data) > MAX_TORRENT_BYTES:
                raise MetainfoError("torrent file too large")
            meta = Metainfo.from_bytes(data)
            if meta.sha256 != digest:
                raise MetainfoError(f"torrent describes {meta.sha256}")
        except MetainfoError as exc:
            log.error("discarding bad torrent file %s: %s", path.name, exc)
            with contextlib.suppress(FileNotFoundError):  # a concurrent load moved it
                path.replace(path.with_suffix(".corrupt"))
            return None
        self._verified.add(digest)
        return data

    def save(self, digest: str, data: bytes) -> None:
        """Write atomically: temp file in the same directory, fsync, rename, fsync dir."""
        path = self.path(digest)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._verified.add(digest)

    def delete(self, digest: str) -> bool:
        """Remove the torrent of ``digest`` (and its repositories); False when there was
        none."""
        path = self.path(digest)
        self._verified.discard(digest)
        self._repositories_path(digest).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _repositories_path(self, digest: str) -> Path:
        return self.path(digest).with_suffix(".repositories")

    def repositories(self, digest: str) -> list[str]:
        """The repositories the blob was indexed or asked for from (what reconciliation
        checks); empty for torrents stored before they were recorded."""
        try:
            text = self._repositories_path(digest).read_text(encoding="ascii")
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        return [line for line in text.splitlines() if is_repository(line)]

    def note_repository(self, digest: str, repository: str) -> None:
        """Record that ``repository`` holds the blob (up to
        :data:`MAX_REPOSITORIES_PER_TORRENT`; atomic replace)."""
        known = self.repositories(digest)
        if repository in known or len(known) >= MAX_REPOSITORIES_PER_TORRENT:
            return
        if not is_repository(repository):
            raise LocalProtocolError(f"not a repository name: {repository[:80]!r}")
        path = self._repositories_path(digest)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(f"{name}\n" for name in [*known, repository]))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def digests(self) -> Iterator[str]:
        for p in self.directory.glob("*.torrent"):
            if len(p.stem) == 64:
                yield "sha256:" + p.stem


# Generation ----------------------------------------------------------------------------


#: Buffers the reader fills while the SHA-1 thread catches up (memory: DEPTH x CHUNK).
HASH_DEPTH: Final = 6


def _hash_blob(reader: BlobReader, builder: MetainfoBuilder, chunk_size: int, depth: int) -> None:
    """Worker thread: fill buffers from ``reader`` and feed ``builder``. This thread reads
    and computes the SHA-256; a second thread computes the piece SHA-1s of each buffer
    handed to it. hashlib and ``recv_into`` release the GIL, so the two hashes run on two
    cores; a pool of ``depth`` buffers bounds memory and is the back-pressure."""
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(depth):
        free.put(bytearray(chunk_size))
    filled: queue.SimpleQueue[tuple[bytearray, memoryview] | None] = queue.SimpleQueue()

    def pieces() -> None:
        while (item := filled.get()) is not None:
            buffer, view = item
            builder.update_pieces(view)
            del view
            free.put(buffer)

    sha1 = threading.Thread(target=pieces, name="p2pimage-sha1", daemon=True)
    sha1.start()
    try:
        while True:
            buffer = free.get()
            whole = memoryview(buffer)
            n = 0
            while n < chunk_size and (got := reader.readinto(whole[n:])):
                n += got
            if n == 0:
                break
            try:
                view = builder.accept(whole[:n])
            except LocalProtocolError as exc:
                raise RegistryError(f"registry sent more than {builder.size} bytes") from exc
            filled.put((buffer, view))
            builder.update_sha256(view)
            del view, whole
            if n < chunk_size:
                break
    finally:
        filled.put(None)
        sha1.join()


async def generate_metainfo(
    client: RegistryClient,
    repository: str,
    digest: str,
    *,
    piece_length: int | None = None,
    chunk_size: int = HASH_CHUNK,
) -> Metainfo:
    """Stream ``repository@digest`` once and return its torrent.

    Raises :class:`DigestMismatchError` when the bytes do not hash to ``digest``,
    :class:`RegistryError` when the registry fails (``transient`` says whether to retry),
    :class:`BlobUnavailableError` for blobs that cannot be torrents (empty, no length).
    The bytes never cross the event loop: a worker thread reads them straight into a pool
    of :data:`HASH_DEPTH` buffers of ``chunk_size`` (the memory held, whatever the blob's
    size) and hashes them with a second thread (:func:`_hash_blob`).
    """
    check_digest(digest)
    async with client.open_blob_reader(repository, digest) as reader:
        if reader.size is None:
            raise BlobUnavailableError(f"registry sent {digest} without a Content-Length")
        if reader.size == 0:
            raise BlobUnavailableError(f"{digest} is empty: nothing to share")
        builder = MetainfoBuilder(reader.size, digest[7:], piece_length)
        # Cancellation abandons the thread; leaving the reader's context then shuts its
        # socket down, so the thread's read fails and it exits.
        await trio.to_thread.run_sync(
            _hash_blob, reader, builder, chunk_size, HASH_DEPTH, abandon_on_cancel=True
        )
    if builder.received != builder.size:
        raise RegistryError(f"registry sent {builder.received} of {builder.size} bytes of {digest}")
    return builder.finish(expected_digest=digest)


def is_distributable(media_type: str) -> bool:
    """False for layers a registry does not serve: Docker foreign layers and OCI
    non-distributable layers (their descriptors carry ``urls`` elsewhere)."""
    return "foreign" not in media_type and "nondistributable" not in media_type


# Indexer -------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Capped exponential backoff. ``max_attempts=None`` retries transient failures
    forever (the registry being down loses nothing); a 404 is retried ``not_found_attempts``
    times (a manifest may reach a replica after its webhook)."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    max_attempts: int | None = None
    not_found_attempts: int = 3

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1)))


@dataclass(frozen=True)
class IndexerSettings:
    """How much the indexer does at once, with its defaults (the sidecar's settings of the
    same names take theirs from here)."""

    #: Tasks fetching manifests (indexes fan out to one manifest per platform).
    manifest_workers: int = 2
    #: Tasks turning blobs into torrents (each mostly waits on the registry).
    blob_workers: int = 4
    #: Blobs streamed and hashed at once: each holds a thread busy on SHA-256 and SHA-1.
    max_generations: int = 2
    #: Work items waiting per queue (manifests, blobs); a webhook beyond it is refused.
    queue_size: int = 1024
    #: Fixed piece length for new torrents; None picks one from the blob's size.
    piece_length: int | None = None


@dataclass
class IndexerHooks:
    """Callbacks for metrics; all optional."""

    generated: Callable[[str, int, float], None] = lambda digest, size, seconds: None
    mismatch: Callable[[str, str], None] = lambda repository, digest: None
    failed: Callable[[str, str], None] = lambda kind, reason: None
    retried: Callable[[str], None] = lambda kind: None


@dataclass(frozen=True)
class WorkItem:
    kind: Literal["manifest", "blob"]
    repository: str
    reference: str  # a digest, or a tag for backfilled manifests
    attempt: int = 1


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    forgotten: bool = False  # the registry deleted the blob meanwhile: store nothing


class Indexer:
    """Decides what to index and runs the generations. Start with
    ``await nursery.start(indexer.run)``; then :meth:`submit_event`, :meth:`torrent`,
    :meth:`backfill`."""

    def __init__(
        self,
        client: RegistryClient,
        store: TorrentStore,
        *,
        settings: IndexerSettings | None = None,
        retry: RetryPolicy | None = None,
        hooks: IndexerHooks | None = None,
    ) -> None:
        settings = settings or IndexerSettings()
        self.client = client
        self.store = store
        self.retry = retry or RetryPolicy()
        self.hooks = hooks or IndexerHooks()
        self.piece_length = settings.piece_length
        self._manifest_workers = settings.manifest_workers
        self._blob_workers = settings.blob_workers
        self._generations = trio.CapacityLimiter(settings.max_generations)
        queue_size = settings.queue_size
        self._manifest_send, self._manifest_recv = trio.open_memory_channel[WorkItem](queue_size)
        self._blob_send, self._blob_recv = trio.open_memory_channel[WorkItem](queue_size)
        self._queue_size = queue_size
        self._queued_blobs: set[str] = set()
        self._pending_manifests: set[tuple[str, str]] = set()
        self._flights: dict[str, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self.retries_pending = 0
        self.generations_started = 0
        self.flights_joined = 0

    # -- lifecycle --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self._manifest_workers):
                nursery.start_soon(self._manifest_worker)
            for _ in range(self._blob_workers):
                nursery.start_soon(self._blob_worker)
            task_status.started()

    @property
    def queued(self) -> int:
        """Work items waiting (manifests + blobs) and retries sleeping."""
        return (
            self._manifest_send.statistics().current_buffer_used
            + self._blob_send.statistics().current_buffer_used
            + self.retries_pending
        )

    @property
    def in_flight(self) -> int:
        """Generations running or waiting for a slot."""
        return len(self._flights)

    @property
    def busy(self) -> bool:
        """True while anything is queued, retrying or being generated."""
        return bool(self.queued or self._flights or self._queued_blobs or self._pending_manifests)

    # -- intake --

    def submit_event(self, event: RegistryEvent) -> bool:
        """Queue a manifest push without waiting. False when the queue is full (the
        webhook then answers 503 and the registry re-sends the event later)."""
        if not event.is_manifest_push:
            raise LocalProtocolError("only valid manifest push events are indexed")
        key = (event.repository, event.digest)
        if key in self._pending_manifests:
            return True  # a re-sent event: already queued or retrying
        # Retrying work counts against the bound too, so a registry that stays down
        # cannot make the sidecar hold an unbounded backlog: the registry keeps it.
        if self.queued >= self._queue_size:
            return False
        try:
            self._manifest_send.send_nowait(WorkItem("manifest", event.repository, event.digest))
        except trio.WouldBlock:
            return False
        self._pending_manifests.add(key)
        return True

    async def submit_manifest(self, repository: str, reference: str) -> None:
        """Queue a manifest, waiting for room (back-pressure)."""
        await self._manifest_send.send(WorkItem("manifest", repository, reference))

    async def backfill(self) -> int:
        """Queue every tagged manifest of every repository in the catalog. Returns how
        many were queued. Already indexed blobs are skipped when the work runs."""
        count = 0
        for repository in await self.client.catalog():
            for tag in await self.client.tags(repository):
                await self.submit_manifest(repository, tag)
                count += 1
        log.info("backfill queued %d manifests", count)
        return count

    def forget(self, digest: str) -> bool:
        """The registry deleted ``digest`` (a delete event): drop its torrent, so nodes
        asking for it get none and pull it from the registry, which answers 404.

        Distribution sends blob deletes per repository and cannot tell them from manifest
        deletes, so a blob deleted from one repository may live on in another: its torrent
        is then generated again on its next request (one read of the blob), which is the
        price of never serving a torrent for bytes the registry no longer has. A
        generation running now is marked so that it stores nothing. Returns whether a
        torrent was dropped."""
        check_digest(digest)
        flight = self._flights.get(digest)
        if flight is not None:
            flight.forgotten = True
        return self.store.delete(digest)

    async def reconcile(self) -> int:
        """Drop the torrents of blobs the registry no longer has: a ``HEAD`` of each
        stored digest in the repositories recorded with it; a torrent goes when every
        one of them answers 404 (a lost delete event, a garbage collection). Any other
        failure keeps the torrent for the next round; a torrent with no repository
        recorded (stored by an older version) is kept. Returns how many were dropped."""
        dropped = 0
        for digest in list(self.store.digests()):
            repositories = self.store.repositories(digest)
            if not repositories or digest in self._flights:
                continue
            gone = True
            for repository in repositories:
                try:
                    if await self.client.head_blob(repository, digest) is not None:
                        gone = False
                        break
                except (RegistryError, LocalProtocolError) as exc:
                    log.info("reconcile: cannot check %s@%s: %s", repository, digest, exc)
                    gone = False
                    break
            if gone and self.forget(digest):
                dropped += 1
                log.info(
                    "reconcile: the registry no longer has %s (%s): torrent dropped",
                    digest,
                    ", ".join(repositories),
                )
        return dropped

    # -- on demand (single flight) --

    async def torrent(self, repository: str, digest: str) -> bytes:
        """The torrent for ``digest``, generated from ``repository`` if not yet stored.
        Concurrent calls for one digest share one generation, which runs in the indexer's
        own nursery: a caller that gives up does not cancel it for the others."""
        check_digest(digest)
        data = self.store.load(digest)
        if data is not None:
            # Another repository may hold the blob too: reconciliation checks them all.
            await trio.to_thread.run_sync(self.store.note_repository, digest, repository)
            return data
        flight = self._flights.get(digest)
        if flight is not None:
            self.flights_joined += 1
        else:
            if self._nursery is None:
                raise LocalProtocolError("Indexer.run is not running")
            flight = _Flight()
            self._flights[digest] = flight
            self._nursery.start_soon(self._generate, repository, digest, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    async def _generate(self, repository: str, digest: str, flight: _Flight) -> None:
        try:
            async with self._generations:
                # Someone may have finished it while we waited for a slot.
                data = self.store.load(digest)
                if data is None:
                    self.generations_started += 1
                    started = time.monotonic()
                    log.info("generating torrent for %s@%s", repository, digest)
                    meta = await generate_metainfo(
                        self.client, repository, digest, piece_length=self.piece_length
                    )
                    data = meta.to_bytes()
                    if not flight.forgotten:
                        await trio.to_thread.run_sync(self.store.save, digest, data)
                        await trio.to_thread.run_sync(
                            self.store.note_repository, digest, repository
                        )
                    if flight.forgotten:  # deleted before or while it was saved
                        self.store.delete(digest)
                        raise BlobUnavailableError(f"{digest} was deleted from the registry")
                    seconds = time.monotonic() - started
                    self.hooks.generated(digest, meta.length, seconds)
                    log.info(
                        "torrent for %s: %d bytes in %d pieces, %.3fs, info-hash %s",
                        digest,
                        meta.length,
                        meta.num_pieces,
                        seconds,
                        meta.info_hash.hex(),
                        extra={
                            "fields": {
                                "event": "torrent_generated",
                                "repository": repository,
                                "digest": digest,
                                "size": meta.length,
                                "seconds": round(seconds, 4),
                                "info_hash": meta.info_hash.hex(),
                            }
                        },
                    )
            flight.data = data
        except DigestMismatchError as exc:
            self.hooks.mismatch(repository, digest)
            log.error(
                "DIGEST MISMATCH %s@%s: %s; no torrent",
                repository,
                digest,
                exc,
                extra={
                    "fields": {
                        "event": "digest_mismatch",
                        "repository": repository,
                        "digest": digest,
                    }
                },
            )
            flight.error = exc
        except Exception as exc:
            flight.error = exc
        finally:
            del self._flights[digest]
            flight.done.set()

    # -- workers --

    async def _manifest_worker(self) -> None:
        async for item in self._manifest_recv:
            key = (item.repository, item.reference)
            try:
                await self._index_manifest(item)
            except Exception as exc:
                self._pending_manifests.discard(key)
                self._failed(item, exc)  # marks it pending again when it retries
            else:
                self._pending_manifests.discard(key)

    async def _index_manifest(self, item: WorkItem) -> None:
        manifest = await self.client.get_manifest(item.repository, item.reference)
        images = [manifest]
        if manifest.is_index:
            images = []
            for d in manifest.manifests:
                if d.media_type not in MANIFEST_TYPES:
                    log.info(
                        "skipping %s in index %s: media type %s",
                        d.digest,
                        manifest.digest,
                        d.media_type,
                    )
                    continue
                sub = await self.client.get_manifest(item.repository, d.digest)
                if not sub.is_index:
                    images.append(sub)
        queued = 0
        for image in images:
            for blob in image.blobs():
                if not is_distributable(blob.media_type):
                    continue  # foreign layers live elsewhere (e.g. Windows base layers)
                if blob.digest in self._queued_blobs or blob.digest in self._flights:
                    continue
                if await trio.to_thread.run_sync(self.store.load, blob.digest) is not None:
                    continue
                self._queued_blobs.add(blob.digest)
                await self._blob_send.send(WorkItem("blob", item.repository, blob.digest))
                queued += 1
        log.info(
            "manifest %s@%s: %d image(s), %d blob(s) queued",
            item.repository,
            item.reference,
            len(images),
            queued,
        )

    async def _blob_worker(self) -> None:
        async for item in self._blob_recv:
            try:
                await self.torrent(item.repository, item.reference)
            except Exception as exc:
                self._queued_blobs.discard(item.reference)
                self._failed(item, exc)  # queues it again when it retries
            else:
                self._queued_blobs.discard(item.reference)

    def _failed(self, item: WorkItem, exc: Exception) -> None:
        transient = isinstance(exc, RegistryError) and exc.transient
        not_found = isinstance(exc, RegistryError) and exc.status == 404
        limit = self.retry.max_attempts
        if not_found:
            limit = self.retry.not_found_attempts
        if (transient or not_found) and (limit is None or item.attempt < limit):
            delay = self.retry.delay(item.attempt)
            log.warning(
                "%s %s@%s failed (attempt %d), retrying in %.1fs: %s",
                item.kind,
                item.repository,
                item.reference,
                item.attempt,
                delay,
                exc,
            )
            self.hooks.retried(item.kind)
            if item.kind == "blob":
                self._queued_blobs.add(item.reference)
            else:
                self._pending_manifests.add((item.repository, item.reference))
            assert self._nursery is not None
            self.retries_pending += 1
            self._nursery.start_soon(self._retry_later, item, delay)
            return
        reason = type(exc).__name__
        self.hooks.failed(item.kind, reason)
        if not isinstance(exc, DigestMismatchError):  # already logged as an alarm
            level = (
                logging.ERROR if isinstance(exc, RegistryError | ManifestError) else logging.WARNING
            )
            if not isinstance(exc, P2PImageError):
                level = logging.ERROR
                log.exception("unexpected failure on %s", item)
            log.log(
                level, "giving up on %s %s@%s: %s", item.kind, item.repository, item.reference, exc
            )

    async def _retry_later(self, item: WorkItem, delay: float) -> None:
        try:
            await trio.sleep(delay)
            again = WorkItem(item.kind, item.repository, item.reference, item.attempt + 1)
            channel = self._blob_send if item.kind == "blob" else self._manifest_send
            await channel.send(again)
        finally:
            self.retries_pending -= 1


def torrent_info_hash(data: bytes) -> bytes:
    """The info-hash of stored torrent bytes (for logs and tests)."""
    return Metainfo.from_bytes(data).info_hash


__all__ = [
    "HASH_CHUNK",
    "BlobUnavailableError",
    "Indexer",
    "IndexerHooks",
    "IndexerSettings",
    "RetryPolicy",
    "TorrentStore",
    "WorkItem",
    "generate_metainfo",
    "is_distributable",
    "torrent_info_hash",
]
