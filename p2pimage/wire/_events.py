"""Events of the peer wire protocol: small frozen value classes, one per message.

Caller-sent events go into :meth:`PeerConnection.send`; every event type but the
handshake-phase ones (:class:`HandshakeReceived`, :class:`ExtendedHandshake`,
:class:`PeerAuthenticated`, :class:`ConnectionClosed`) can also come out of
:meth:`PeerConnection.next_event`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from p2pimage.auth.tokens import NodeToken

__all__ = [
    "NEED_DATA",
    "Bitfield",
    "Cancel",
    "Choke",
    "ConnectionClosed",
    "ConnectionState",
    "Event",
    "Extended",
    "ExtendedHandshake",
    "HandshakeReceived",
    "Have",
    "Interested",
    "KeepAlive",
    "Message",
    "NeedData",
    "NotInterested",
    "PeerAuthenticated",
    "Piece",
    "Port",
    "Request",
    "Role",
    "Unchoke",
]


class Role(enum.Enum):
    """Which end of the TCP connection we are."""

    INITIATOR = "initiator"  # dialed out; knows the info-hash; sends the handshake first
    RESPONDER = "responder"  # accepted; learns the info-hash from the peer's handshake


class ConnectionState(enum.Enum):
    """Where the connection is in its handshake; see ``docs/protocol.md``."""

    AWAIT_HANDSHAKE = "await_handshake"  # reading the peer's 68-byte handshake
    AWAIT_ACCEPT = "await_accept"  # responder: caller must accept() or reject() the info-hash
    AWAIT_EXT_HANDSHAKE = "await_ext_handshake"  # authenticated mode: the peer's BEP 10 handshake
    AWAIT_AUTH = "await_auth"  # authenticated mode: the peer's one auth message
    OPEN = "open"  # BEP 3 messages may flow both ways
    CLOSED = "closed"  # EOF, reject(), close(), or a protocol error


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel (an enum, so ``is NEED_DATA`` narrows types)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()`` returns this when it needs more bytes from ``receive_data()``.
NEED_DATA: Final = NeedData.NEED_DATA


# --- handshake-phase events (received only) -------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeReceived:
    """The peer's 68-byte handshake.

    A RESPONDER must answer with ``accept()`` or ``reject()`` before calling
    ``next_event()`` again; an INITIATOR has already checked the info-hash.
    """

    info_hash: bytes
    peer_id: bytes
    reserved: bytes

    @property
    def supports_extensions(self) -> bool:
        """BEP 10: bit 20 from the right, ``reserved[5] & 0x10``."""
        return bool(self.reserved[5] & 0x10)


@dataclass(frozen=True, slots=True)
class ExtendedHandshake:
    """The peer's BEP 10 extended handshake (message 20, extended id 0).

    ``extensions`` maps extension names to the ids the peer wants them sent with;
    ``listen_port`` is BEP 10's ``p`` (the TCP port the peer listens on; ``None`` when
    absent or not a port); ``payload`` is the whole decoded dictionary
    (``metadata_size``, ``yourip``...).
    """

    extensions: dict[bytes, int]
    client: bytes | None = None
    reqq: int | None = None
    payload: dict[bytes, Any] = field(default_factory=dict)
    listen_port: int | None = None


@dataclass(frozen=True, slots=True)
class PeerAuthenticated:
    """The peer proved possession of the key its node token binds; the connection is open."""

    token: NodeToken


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly (EOF on a message boundary)."""


# --- BEP 3 / BEP 10 messages (sent and received) ---------------------------------------


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Choke:
    pass


@dataclass(frozen=True, slots=True)
class Unchoke:
    pass


@dataclass(frozen=True, slots=True)
class Interested:
    pass


@dataclass(frozen=True, slots=True)
class NotInterested:
    pass


@dataclass(frozen=True, slots=True)
class Have:
    index: int


@dataclass(frozen=True, slots=True)
class Bitfield:
    """Bit ``i`` (MSB first) set = the sender has piece ``i``; spare bits are zero."""

    bitfield: bytes


@dataclass(frozen=True, slots=True)
class Request:
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class Piece:
    """A block of a piece. Received blocks are ``bytes`` (one copy out of the buffer);
    sent blocks may be any bytes-like object."""

    index: int
    begin: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Cancel:
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class Port:
    """BEP 5: the sender's DHT port."""

    port: int


@dataclass(frozen=True, slots=True)
class Extended:
    """A BEP 10 extended message other than the handshake and our auth message.

    Received: ``extended_id`` is the id *we* advertised for the extension.
    Sent: ``extended_id`` is the id the *peer* advertised (``peer_extension_id(name)``).
    """

    extended_id: int
    payload: bytes


Message = (
    KeepAlive
    | Choke
    | Unchoke
    | Interested
    | NotInterested
    | Have
    | Bitfield
    | Request
    | Piece
    | Cancel
    | Port
    | Extended
)

Event = Message | HandshakeReceived | ExtendedHandshake | PeerAuthenticated | ConnectionClosed
