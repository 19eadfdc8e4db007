"""The BitTorrent peer wire protocol with JWT proof-of-possession authentication (sans-I/O).

``PeerConnection`` owns one connection's state; events are small frozen dataclasses.
See ``docs/protocol.md`` for the byte layouts and the authentication sequence.
"""

from __future__ import annotations

from ._codec import (
    AUTH_EXTENSION,
    BLOCK_LENGTH,
    MAX_BLOCK_LENGTH_LIMIT,
    NONCE_KEY,
    NONCE_LENGTH,
    PROTOCOL_VERSION,
    auth_transcript,
    encode_message,
    handshake_context,
    piece_header,
)
from ._connection import Authenticator, PeerConnection
from ._events import (
    NEED_DATA,
    Bitfield,
    Cancel,
    Choke,
    ConnectionClosed,
    ConnectionState,
    Event,
    Extended,
    ExtendedHandshake,
    HandshakeReceived,
    Have,
    Interested,
    KeepAlive,
    Message,
    NeedData,
    NotInterested,
    PeerAuthenticated,
    Piece,
    Port,
    Request,
    Role,
    Unchoke,
)

__all__ = [
    "AUTH_EXTENSION",
    "BLOCK_LENGTH",
    "MAX_BLOCK_LENGTH_LIMIT",
    "NEED_DATA",
    "NONCE_KEY",
    "NONCE_LENGTH",
    "PROTOCOL_VERSION",
    "Authenticator",
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
    "PeerConnection",
    "Piece",
    "Port",
    "Request",
    "Role",
    "Unchoke",
    "auth_transcript",
    "handshake_context",
    "encode_message",
    "piece_header",
]
