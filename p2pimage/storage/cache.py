"""The node's layer cache: content-addressed blobs on disk under a quota, LRU eviction.

Blobs are keyed by (registry, digest), never by digest alone: a blob is only ever served
for the registry it was fetched from (see docs/operations.md, "Trust model"). Each
registry has its own subdirectory, named by :func:`registry_namespace`; a cache key is
``<namespace>/<hex>`` (:func:`blob_key`). A namespace holds the blob files of
:mod:`p2pimage.storage.layout`: ``<hex>`` a complete, verified blob; ``<hex>.partial`` and
``<hex>.state`` a blob being downloaded (see :class:`~p2pimage.storage.pieces.PieceStorage`);
``<hex>.torrent`` its torrent, kept so a restarted node can seed and resume. Blobs left at
the top level by an older version (keyed by digest alone) count toward the quota and are
evicted first-come by LRU, but no lookup ever finds them.

A blob that is pinned (being served to a runtime, or seeded by a live swarm) is never
evicted; space for a new blob is made by evicting the least recently used unpinned
blobs. If even that cannot make room, :meth:`BlobCache.reserve` says no and the caller
serves the pull straight from the registry instead: a full disk never fails a pull.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from p2pimage.errors import LocalProtocolError, MetainfoError, StorageError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.layout import BlobFiles, parse_blob_file_name

__all__ = ["BlobCache", "CachedBlob", "blob_key", "registry_namespace"]

log = logging.getLogger("p2pimage.storage.cache")

_HEX = re.compile(r"[0-9a-f]{64}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,120}-[0-9a-f]{12}")


def registry_namespace(registry_url: str) -> str:
    """The cache subdirectory of the registry at ``registry_url`` (its base URL).

    Readable (the URL with unsafe characters replaced) and unambiguous (a hash of the
    exact URL): ``http://127.0.0.1:5000`` → ``http_127.0.0.1_5000-<12 hex>``.
    """
    url = registry_url.rstrip("/")
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", url)[:100].strip("_") or "registry"
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def blob_key(namespace: str, hex_: str) -> str:
    """The cache key of blob ``hex_`` fetched from the registry of ``namespace``."""
    if not _NAMESPACE.fullmatch(namespace) or not _HEX.fullmatch(hex_):
        raise LocalProtocolError(f"not a cache key: {namespace!r}/{hex_!r}")
    return f"{namespace}/{hex_}"


@dataclass
class CachedBlob:
    hex: str  # the cache key: ``<namespace>/<hex>`` (see :func:`blob_key`)
    size: int  # bytes the blob occupies or will occupy when complete
    last_used: float
    complete: bool


class BlobCache:
    """Quota and LRU bookkeeping over one directory of blobs."""

    def __init__(self, root: Path, quota_bytes: int) -> None:
        if quota_bytes <= 0:
            raise LocalProtocolError("the cache quota must be positive")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self._entries: dict[str, CachedBlob] = {}
        self._pins: Counter[str] = Counter()
        self._gone: set[str] = set()  # the registry no longer has these: evict at unpin
        self.evictions = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create cache directory {self.root}: {exc}") from None
        self.scan()

    # --- index --------------------------------------------------------------------------

    def scan(self) -> None:
        """Rebuild the index from the directory (start-up, or after outside changes)."""
        entries: dict[str, CachedBlob] = {}
        try:
            names = [("", n) for n in os.listdir(self.root)]
            for sub in [n for _, n in names if _NAMESPACE.fullmatch(n)]:
                if (self.root / sub).is_dir():
                    names += [(sub + "/", n) for n in os.listdir(self.root / sub)]
        except OSError as exc:
            raise StorageError(f"cannot list cache directory {self.root}: {exc}") from None
        for prefix, name in names:
            parsed = parse_blob_file_name(name)
            if parsed is None:
                continue
            hex_, kind = parsed
            try:
                st = os.stat(self.root / prefix / name)
            except OSError:
                continue
            key = prefix + hex_
            entry = entries.setdefault(key, CachedBlob(key, 0, st.st_mtime, False))
            entry.last_used = max(entry.last_used, st.st_mtime)
            if kind == "blob":
                entry.complete = True
                entry.size = max(entry.size, st.st_size)
            elif kind == "partial":
                entry.size = max(entry.size, st.st_size)
        self._entries = entries

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def entry(self, key: str) -> CachedBlob | None:
        return self._entries.get(key)

    def is_complete(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.complete and self.blob_path(key).exists()

    def files(self, key: str) -> BlobFiles:
        """The files of the blob with cache key ``key`` (``<namespace>/<hex>``)."""
        namespace, _, hex_ = key.rpartition("/")
        return BlobFiles(self.root / namespace if namespace else self.root, hex_)

    def blob_path(self, key: str) -> Path:
        return self.files(key).blob

    def torrent_path(self, key: str) -> Path:
        return self.files(key).torrent

    def directory(self, namespace: str) -> Path:
        """Where the blobs of one registry live (the directory piece storage writes)."""
        return self.root / namespace

    def complete_with_torrents(self, namespace: str) -> list[Metainfo]:
        """Complete blobs of one registry whose torrent is kept: what a restarted node
        seeds again."""
        out = []
        for key, entry in self._entries.items():
            ns, _, hex_ = key.rpartition("/")
            if not entry.complete or ns != namespace:
                continue
            try:
                meta = Metainfo.from_bytes(self.torrent_path(key).read_bytes())
            except (OSError, MetainfoError):
                continue
            if meta.digest_hex == hex_:
                out.append(meta)
        return out

    def save_torrent(self, meta: Metainfo, namespace: str) -> None:
        path = self.torrent_path(blob_key(namespace, meta.digest_hex))
        tmp = path.with_suffix(".torrent.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(meta.to_bytes())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None

    # --- use ----------------------------------------------------------------------------

    def pin(self, key: str) -> None:
        self._pins[key] += 1

    def unpin(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
            if key in self._gone:
                self._gone.discard(key)
                self.evict(key)

    def discard(self, key: str) -> bool:
        """The registry no longer has blob ``key``: evict it now, or, while it is
        pinned (a reader or its swarm still on it), when the last pin goes. Returns
        whether the cache held anything of it."""
        if key not in self._entries and not any(p.exists() for p in self.files(key).all()):
            return False
        if self.is_pinned(key):
            self._gone.add(key)
        else:
            self.evict(key)
        return True

    def is_pinned(self, key: str) -> bool:
        return self._pins[key] > 0

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_used = now
            # Persist recency cheaply, so LRU order survives a restart.
            files = self.files(key)
            for path in (files.blob, files.partial):
                try:
                    os.utime(path, (now, now))
                    break
                except OSError:
                    continue

    def mark_complete(self, key: str, size: int, now: float) -> None:
        self._entries[key] = CachedBlob(key, size, now, True)

    def reserve(self, key: str, size: int, now: float) -> bool:
        """Make room for blob ``key`` of ``size`` bytes, evicting LRU unpinned blobs.

        Returns False (and evicts nothing) when pinned blobs leave too little space.
        """
        self._gone.discard(key)  # wanted again: the registry has it (again)
        existing = self._entries.get(key)
        if existing is not None:
            existing.last_used = now
            existing.size = max(existing.size, size)
            return self.used_bytes <= self.quota_bytes or self._evict_for(0, keep=key)
        if size > self.quota_bytes:
            return False
        if not self._evict_for(size, keep=key):
            return False
        self._entries[key] = CachedBlob(key, size, now, False)
        return True

    def _evict_for(self, size: int, *, keep: str) -> bool:
        need = self.used_bytes + size - self.quota_bytes
        if need <= 0:
            return True
        victims = sorted(
            (e for e in self._entries.values() if e.hex != keep and not self.is_pinned(e.hex)),
            key=lambda e: e.last_used,
        )
        if sum(e.size for e in victims) < need:
            return False
        for victim in victims:
            if need <= 0:
                break
            self.evict(victim.hex)
            need -= victim.size
        return True

    def evict(self, key: str) -> None:
        if self.is_pinned(key):
            raise LocalProtocolError(f"blob {key} is pinned")
        for path in self.files(key).all():
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)
        self._entries.pop(key, None)
        self.evictions += 1
        log.info("evicted blob %s", key)
