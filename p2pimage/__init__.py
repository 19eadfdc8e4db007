"""p2pimage: peer-to-peer distribution of container image layers.

The library is importable without the daemons. Protocol code is sans-I/O; a thin trio
layer drives it.
"""

from __future__ import annotations

from .announce import AnnounceSettings, TrackerClient, TrackerError
from .auth import (
    KeySet,
    NodeKey,
    NodeToken,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    local_authenticator,
)
from .client import PeerNode, open_peer_node
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
from .metainfo import Metainfo, MetainfoBuilder, create_metainfo_from_file
from .origin import OriginReader
from .ratelimit import RateLimiter
from .storage import PieceStorage
from .swarm import Swarm, SwarmSettings

__all__ = [
    "AnnounceSettings",
    "AuthError",
    "BencodeError",
    "DigestMismatchError",
    "KeySet",
    "LocalProtocolError",
    "Metainfo",
    "MetainfoBuilder",
    "MetainfoError",
    "NodeKey",
    "NodeToken",
    "OriginReader",
    "P2PImageError",
    "PeerAuthenticator",
    "PeerNode",
    "PieceHashError",
    "PieceStorage",
    "RateLimiter",
    "RemoteProtocolError",
    "SigningKey",
    "StorageError",
    "Swarm",
    "SwarmSettings",
    "TokenIssuer",
    "TokenVerifier",
    "TrackerClient",
    "TrackerError",
    "create_metainfo_from_file",
    "local_authenticator",
    "open_peer_node",
]

__version__ = "0.1.0"
