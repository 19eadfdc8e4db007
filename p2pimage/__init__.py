"""p2pimage: peer-to-peer distribution of container image layers.

The library is importable without the daemons. Protocol code is sans-I/O; a thin trio
layer drives it.
"""

from __future__ import annotations

from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    NodeToken,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    bound_peer_id,
    local_authenticator,
)
from p2pimage.errors import (
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
from p2pimage.metainfo.torrent import Metainfo, MetainfoBuilder, create_metainfo_from_file
from p2pimage.sidecar.client import DPoPAuth
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.node import PeerNode, open_peer_node
from p2pimage.swarm.origin import OriginReader
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.tracker.client import AnnounceSettings, TrackerClient, TrackerError

__all__ = [
    "PROTOCOL_VERSION",
    "AnnounceSettings",
    "AuthError",
    "BencodeError",
    "DPoPAuth",
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
    "bound_peer_id",
    "create_metainfo_from_file",
    "local_authenticator",
    "open_peer_node",
]

__version__ = "0.1.0"
#: The peer and tracker protocol generation (docs/protocol.md; the peer-auth transcript
#: label carries it). The image and the manifests are labelled with it; nodes of two
#: generations do not exchange pieces (docs/operations.md, "Upgrades").
PROTOCOL_VERSION = 3
