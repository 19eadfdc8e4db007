"""The project's error types.

Two families say whose fault it was, as in h11: :class:`LocalProtocolError` means our
caller misused us; :class:`RemoteProtocolError` means the other side (a peer, a torrent
file, a tracker, a token) sent something malformed or unacceptable. A decoder fed garbage
never raises anything but a :class:`RemoteProtocolError`.
"""

from __future__ import annotations


class P2PImageError(Exception):
    """Base class of every error p2pimage raises on purpose."""


class LocalProtocolError(P2PImageError):
    """Our caller asked for something the protocol does not allow."""


class RemoteProtocolError(P2PImageError):
    """The remote side sent something malformed or not allowed."""


class BencodeError(RemoteProtocolError):
    """Bytes that are not canonical, bounded bencoding."""


class MetainfoError(RemoteProtocolError):
    """A torrent that is not a valid p2pimage/BEP 3 single-file torrent."""


class AuthError(RemoteProtocolError):
    """A token, key or signature that does not verify.

    ``reason`` is a short machine-readable code (``expired``, ``bad_signature``,
    ``wrong_cluster``, ``unknown_kid``...) suitable for logs and metrics labels.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ProtocolVersionError(RemoteProtocolError):
    """The peer speaks another version of the p2pimage peer protocol (a rolling upgrade
    in progress): the connection is refused and the pull falls back as usual."""

    def __init__(self, peer_version: int, our_version: int) -> None:
        age = "an older" if peer_version < our_version else "a newer"
        super().__init__(
            f"peer speaks {age} p2pimage peer protocol (v{peer_version}, this node v"
            f"{our_version}): connection refused; upgrade the older node"
        )
        self.peer_version = peer_version
        self.our_version = our_version


class StorageError(P2PImageError):
    """The piece store could not read or write its files (disk full, I/O error...)."""


class PieceHashError(RemoteProtocolError):
    """A piece whose bytes do not match the hash in the metainfo."""

    def __init__(self, index: int) -> None:
        super().__init__(f"piece {index} failed its hash check")
        self.index = index


class DigestMismatchError(RemoteProtocolError):
    """A whole blob whose SHA-256 does not match its OCI digest."""


class StorageBusyError(P2PImageError):
    """Back-pressure, not a fault: the piece store holds as many pieces in assembly as
    it may (``max_pieces_in_progress``) and did not take a block that starts another.
    The caller drops the block and asks for it again later."""


class PeerClosed(P2PImageError):
    """A peer session ended: EOF, a protocol error, or we closed it (``reason`` says
    which). Ends that one session, never the swarm or the node."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateUnavailableError(P2PImageError):
    """The tracker's shared state could not be read or written (Redis down, timeouts)."""


def leaf_exceptions(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (possibly nested) exception group, in order.

    trio nurseries wrap failures in groups; callers report the failures themselves.
    """
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(leaf_exceptions(exc))
        else:
            out.append(exc)
    return out
