"""p2pimage: peer-to-peer distribution of container image layers.

The library is importable without the daemons. Protocol code is sans-I/O; a thin trio
layer drives it.
"""

from __future__ import annotations

from .errors import (
    AuthError,
    BencodeError,
    DigestMismatchError,
    LocalProtocolError,
    MetainfoError,
    P2PImageError,
    PieceHashError,
    RemoteProtocolError,
    StorageError,
)

__all__ = [
    "AuthError",
    "BencodeError",
    "DigestMismatchError",
    "LocalProtocolError",
    "MetainfoError",
    "P2PImageError",
    "PieceHashError",
    "RemoteProtocolError",
    "StorageError",
]

__version__ = "0.1.0"
