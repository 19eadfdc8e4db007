"""The on-disk layout of blobs: one owner for the file names.

Under one directory, content-addressed by the blob's SHA-256 hex:

- ``<hex>`` — the finished blob, verified whole against its digest;
- ``<hex>.partial`` — the blob being assembled, a sparse file of its full length;
- ``<hex>.state`` — the verified-piece record of the partial file (replaced atomically
  through ``<hex>.state.tmp``);
- ``<hex>.torrent`` — its torrent, kept so a restarted node can seed and resume.

:class:`~p2pimage.storage.pieces.PieceStorage` writes the first three,
:class:`~p2pimage.storage.cache.BlobCache` accounts for and evicts all four; both take
the names from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = ["BLOB_FILE_KINDS", "BlobFileKind", "BlobFiles", "parse_blob_file_name"]

BlobFileKind = Literal["blob", "partial", "state", "torrent"]

#: Each kind of file a blob may have, with its suffix after the hex digest.
BLOB_FILE_KINDS: Final[dict[BlobFileKind, str]] = {
    "blob": "",
    "partial": ".partial",
    "state": ".state",
    "torrent": ".torrent",
}

_HEX: Final = re.compile(r"[0-9a-f]{64}")
_KIND_OF_SUFFIX: Final[dict[str, BlobFileKind]] = {v: k for k, v in BLOB_FILE_KINDS.items()}


@dataclass(frozen=True, slots=True)
class BlobFiles:
    """The paths of one blob's files under ``root``."""

    root: Path
    hex: str

    @property
    def blob(self) -> Path:
        return self.root / self.hex

    @property
    def partial(self) -> Path:
        return self.root / f"{self.hex}.partial"

    @property
    def state(self) -> Path:
        return self.root / f"{self.hex}.state"

    @property
    def torrent(self) -> Path:
        return self.root / f"{self.hex}.torrent"

    def all(self) -> list[Path]:
        """Every file the blob may have, the finished blob first."""
        return [self.root / f"{self.hex}{suffix}" for suffix in BLOB_FILE_KINDS.values()]


def parse_blob_file_name(name: str) -> tuple[str, BlobFileKind] | None:
    """``(hex, kind)`` for a name of this layout; None for any other file (temporaries
    included)."""
    hex_, dot, suffix = name.partition(".")
    kind = _KIND_OF_SUFFIX.get(dot + suffix)
    if kind is None or not _HEX.fullmatch(hex_):
        return None
    return hex_, kind
