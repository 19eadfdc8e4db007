"""p2pimage: peer-to-peer distribution of container image layers.

The library is importable without the daemons. Protocol code is sans-I/O; a thin trio
layer drives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pimage._lazy import lazy_names
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

if TYPE_CHECKING:
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
    from p2pimage.metainfo.torrent import Metainfo, MetainfoBuilder, create_metainfo_from_file
    from p2pimage.sidecar.client import DPoPAuth
    from p2pimage.storage.pieces import PieceStorage
    from p2pimage.swarm.engine import Swarm, SwarmSettings
    from p2pimage.swarm.node import PeerNode, open_peer_node
    from p2pimage.swarm.origin import OriginReader
    from p2pimage.swarm.ratelimit import RateLimiter
    from p2pimage.tracker.client import AnnounceSettings, TrackerClient, TrackerError

# The rest of the public names, imported on first use (module ``__getattr__``, PEP 562):
# a process that needs one part (the tracker, the sidecar, a command) does not pay for
# the swarm engine, storage and auth it never runs (docs/benchmarks.md, start-up).
_LAZY: dict[str, str] = {
    "AnnounceSettings": "p2pimage.tracker.client",
    "DPoPAuth": "p2pimage.sidecar.client",
    "KeySet": "p2pimage.auth.tokens",
    "Metainfo": "p2pimage.metainfo.torrent",
    "MetainfoBuilder": "p2pimage.metainfo.torrent",
    "NodeKey": "p2pimage.auth.tokens",
    "NodeToken": "p2pimage.auth.tokens",
    "OriginReader": "p2pimage.swarm.origin",
    "PeerAuthenticator": "p2pimage.auth.tokens",
    "PeerNode": "p2pimage.swarm.node",
    "PieceStorage": "p2pimage.storage.pieces",
    "RateLimiter": "p2pimage.swarm.ratelimit",
    "SigningKey": "p2pimage.auth.tokens",
    "Swarm": "p2pimage.swarm.engine",
    "SwarmSettings": "p2pimage.swarm.engine",
    "TokenIssuer": "p2pimage.auth.tokens",
    "TokenVerifier": "p2pimage.auth.tokens",
    "TrackerClient": "p2pimage.tracker.client",
    "TrackerError": "p2pimage.tracker.client",
    "bound_peer_id": "p2pimage.auth.tokens",
    "create_metainfo_from_file": "p2pimage.metainfo.torrent",
    "local_authenticator": "p2pimage.auth.tokens",
    "open_peer_node": "p2pimage.swarm.node",
}


__getattr__, __dir__ = lazy_names(globals(), _LAZY)


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
