"""The node's layer cache: content-addressed blobs on disk under a quota, LRU eviction.

Layout (one directory): the blob files of :mod:`p2pimage.storage.layout`: ``<hex>`` a
complete, verified blob; ``<hex>.partial`` and ``<hex>.state`` a blob being downloaded
(see :class:`~p2pimage.storage.pieces.PieceStorage`); ``<hex>.torrent`` its torrent, kept
so a restarted node can seed and resume.

A blob that is pinned (being served to a runtime, or seeded by a live swarm) is never
evicted; space for a new blob is made by evicting the least recently used unpinned
blobs. If even that cannot make room, :meth:`BlobCache.reserve` says no and the caller
serves the pull straight from the registry instead: a full disk never fails a pull.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from p2pimage.errors import LocalProtocolError, MetainfoError, StorageError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.layout import BlobFiles, parse_blob_file_name

__all__ = ["BlobCache", "CachedBlob"]

log = logging.getLogger("p2pimage.storage.cache")


@dataclass
class CachedBlob:
    hex: str
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
            names = os.listdir(self.root)
        except OSError as exc:
            raise StorageError(f"cannot list cache directory {self.root}: {exc}") from None
        for name in names:
            parsed = parse_blob_file_name(name)
            if parsed is None:
                continue
            hex_, kind = parsed
            try:
                st = os.stat(self.root / name)
            except OSError:
                continue
            entry = entries.setdefault(hex_, CachedBlob(hex_, 0, st.st_mtime, False))
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

    def entry(self, hex_: str) -> CachedBlob | None:
        return self._entries.get(hex_)

    def is_complete(self, hex_: str) -> bool:
        entry = self._entries.get(hex_)
        return entry is not None and entry.complete and self.blob_path(hex_).exists()

    def files(self, hex_: str) -> BlobFiles:
        return BlobFiles(self.root, hex_)

    def blob_path(self, hex_: str) -> Path:
        return self.files(hex_).blob

    def torrent_path(self, hex_: str) -> Path:
        return self.files(hex_).torrent

    def complete_with_torrents(self) -> list[Metainfo]:
        """Complete blobs whose torrent is kept: what a restarted node seeds again."""
        out = []
        for hex_, entry in self._entries.items():
            if not entry.complete:
                continue
            try:
                meta = Metainfo.from_bytes(self.torrent_path(hex_).read_bytes())
            except (OSError, MetainfoError):
                continue
            if meta.digest_hex == hex_:
                out.append(meta)
        return out

    def save_torrent(self, meta: Metainfo) -> None:
        path = self.torrent_path(meta.digest_hex)
        tmp = path.with_suffix(".torrent.tmp")
        try:
            tmp.write_bytes(meta.to_bytes())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None

    # --- use ----------------------------------------------------------------------------

    def pin(self, hex_: str) -> None:
        self._pins[hex_] += 1

    def unpin(self, hex_: str) -> None:
        self._pins[hex_] -= 1
        if self._pins[hex_] <= 0:
            del self._pins[hex_]

    def is_pinned(self, hex_: str) -> bool:
        return self._pins[hex_] > 0

    def touch(self, hex_: str, now: float) -> None:
        entry = self._entries.get(hex_)
        if entry is not None:
            entry.last_used = now
            # Persist recency cheaply, so LRU order survives a restart.
            files = self.files(hex_)
            for path in (files.blob, files.partial):
                try:
                    os.utime(path, (now, now))
                    break
                except OSError:
                    continue

    def mark_complete(self, hex_: str, size: int, now: float) -> None:
        self._entries[hex_] = CachedBlob(hex_, size, now, True)

    def reserve(self, hex_: str, size: int, now: float) -> bool:
        """Make room for blob ``hex_`` of ``size`` bytes, evicting LRU unpinned blobs.

        Returns False (and evicts nothing) when pinned blobs leave too little space.
        """
        existing = self._entries.get(hex_)
        if existing is not None:
            existing.last_used = now
            existing.size = max(existing.size, size)
            return self.used_bytes <= self.quota_bytes or self._evict_for(0, keep=hex_)
        if size > self.quota_bytes:
            return False
        if not self._evict_for(size, keep=hex_):
            return False
        self._entries[hex_] = CachedBlob(hex_, size, now, False)
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

    def evict(self, hex_: str) -> None:
        if self.is_pinned(hex_):
            raise LocalProtocolError(f"blob {hex_} is pinned")
        for path in self.files(hex_).all():
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path.name, exc)
        self._entries.pop(hex_, None)
        self.evictions += 1
        log.info("evicted blob sha256:%s", hex_)
