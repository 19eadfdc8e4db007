"""Byte layouts of the peer wire: constants with their provenance, encoders, the auth
transcript. The stateful decoding lives in ``_connection.py``; everything here is pure.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, Final

from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import Bencodable, bencode

from ._events import (
    Bitfield,
    Cancel,
    Choke,
    Extended,
    Have,
    Interested,
    KeepAlive,
    Message,
    NotInterested,
    Piece,
    Port,
    Request,
    Role,
    Unchoke,
)

# --- handshake (BEP 3, BEP 10) ----------------------------------------------------------

PROTOCOL_NAME: Final = b"BitTorrent protocol"
HANDSHAKE_PREFIX: Final = bytes([len(PROTOCOL_NAME)]) + PROTOCOL_NAME
HANDSHAKE_LENGTH: Final = 68  # 1 + 19 + 8 reserved + 20 info-hash + 20 peer id
# BEP 10: "the 20th bit from the right (counting starting at 0)" = reserved[5] & 0x10.
EXTENSION_BIT_BYTE: Final = 5
EXTENSION_BIT_MASK: Final = 0x10

# --- message ids (BEP 3, BEP 5, BEP 10) -------------------------------------------------

MSG_CHOKE: Final = 0
MSG_UNCHOKE: Final = 1
MSG_INTERESTED: Final = 2
MSG_NOT_INTERESTED: Final = 3
MSG_HAVE: Final = 4
MSG_BITFIELD: Final = 5
MSG_REQUEST: Final = 6
MSG_PIECE: Final = 7
MSG_CANCEL: Final = 8
MSG_PORT: Final = 9
MSG_EXTENDED: Final = 20
EXT_HANDSHAKE_ID: Final = 0  # BEP 10: extended message id 0 is the extended handshake

# --- our BEP 10 extension ---------------------------------------------------------------

# The peer protocol's version, carried in the auth extension's name so that peers of
# different versions recognise each other in their extended handshakes and refuse each
# other cleanly (docs/protocol.md, "Rolling upgrade"). Version 2 called the extension
# plain "p2pimage_auth" (tokens in the clear, encryption after them); version 3 exchanges
# keys first and carries both auth messages encrypted, the responder's last.
PROTOCOL_VERSION: Final = 3
AUTH_EXTENSION: Final = b"p2pimage_auth_v3"  # name in "m"; the auth message goes to its id
_AUTH_PREFIX: Final = b"p2pimage_auth"
NONCE_KEY: Final = b"p2pimage_nonce"  # extended-handshake key carrying the 32-byte nonce
NONCE_LENGTH: Final = 32
KX_LENGTH: Final = 32
# Extended-handshake key carrying the sender's ephemeral X25519 public key (32 bytes);
# required from both sides (the auth messages travel encrypted under it).
KX_KEY: Final = b"p2pimage_kx"
# Extended-handshake key (value 1) of a side configured to send piece traffic in the
# clear after authentication (``peer_encryption = false``). Both sides must agree: a
# side that encrypts refuses a peer that sends it, and the reverse.
PLAIN_KEY: Final = b"p2pimage_plain"
# Extended-handshake key carrying the largest block (bytes) the sender accepts in a
# request or a piece message, when above BLOCK_LENGTH. Absent (every stock client):
# BLOCK_LENGTH. Two p2pimage peers then request whole pieces up to this size, one
# message, one storage write and one hash per piece instead of one per 16 KiB.
BLOCK_LENGTH_KEY: Final = b"p2pimage_block"
# BEP 10's "p": the TCP port the sender listens on. A connection's source port is
# ephemeral; with this the accepting side knows the address the tracker lists for the
# peer, and does not dial a peer it is already connected to (libtorrent sends it too).
LISTEN_PORT_KEY: Final = b"p"
# BEP 10 extension between p2pimage peers: many haves in one message, its payload the
# piece indexes as u32 big-endian. Every node tells every peer about every piece it
# verifies (pieces x peers haves per node: a million at 32 nodes and 1,024 pieces), so
# one message per writer batch instead of one per piece saves a parse, a dispatch and
# an encode per have. Stock clients do not advertise it and get BEP 3 haves.
HAVES_EXTENSION: Final = b"p2pimage_haves"
LOCAL_HAVES_ID: Final = 2
# The id we ask peers to send our auth message with. Any of 1..255 would do (BEP 10 ids are
# chosen by the receiver); callers' own extensions must not reuse it.
LOCAL_AUTH_ID: Final = 1
# Transcript label: protocol name and version, NUL-terminated so no prefix collides.
TRANSCRIPT_LABEL: Final = b"p2pimage-peer-auth/3\x00"
_ROLE_TAG: Final = {Role.INITIATOR: b"I", Role.RESPONDER: b"R"}


def auth_extension_version(name: bytes) -> int | None:
    """The peer protocol version an extension name announces: 2 for the unversioned
    ``p2pimage_auth`` of version 2, N for ``p2pimage_auth_vN``, None for other names."""
    if name == _AUTH_PREFIX:
        return 2
    prefix = _AUTH_PREFIX + b"_v"
    digits = name[len(prefix) :]
    if name.startswith(prefix) and digits.isdigit() and len(digits) <= 4:
        return int(digits)
    return None


# --- bounds -----------------------------------------------------------------------------

# BEP 3: "All current implementations use 2^14 (16 kiB)" and close connections that
# request more; every stock client (libtorrent, aria2, Transmission) asks for 16 KiB.
BLOCK_LENGTH: Final = 16 * 1024
# The largest block a p2pimage connection may be configured to allow (``max_block_length``)
# for larger blocks negotiated between p2pimage peers (BLOCK_LENGTH_KEY); stock clients
# never see it (they get 16 KiB requests and send 16 KiB ones). 256 KiB: one encrypted
# record (MAX_RECORD_PLAINTEXT) and well inside DEFAULT_MAX_RECEIVE_BUFFER; the per-block
# costs (a message, a request, a pread) are then small beside copying and hashing it.
MAX_BLOCK_LENGTH_LIMIT: Final = 256 * 1024
# libtorrent's load_torrent_limits::max_pieces (0x200000) is the largest piece count a
# stock client opens; its bitfield is 2^21 / 8 = 256 KiB.
MAX_PIECES: Final = 0x200000
MAX_BITFIELD_LENGTH: Final = MAX_PIECES // 8
# Extended messages other than piece data: the biggest common one is a BEP 9 ut_metadata
# data message (a 16 KiB metadata block plus a small dictionary); our auth message is
# ~1 KiB; extended handshakes are a few hundred bytes. 64 KiB leaves 4x headroom.
DEFAULT_MAX_EXTENDED_LENGTH: Final = 64 * 1024
# An auth message holds a JWT (auth.MAX_TOKEN_BYTES = 8192) and a 64-byte signature.
MAX_AUTH_TOKEN_LENGTH: Final = 8192
MAX_AUTH_SIGNATURE_LENGTH: Final = 512
# Decode limits for extended-handshake/auth dictionaries: real ones nest two levels
# ({"m": {...}}) and hold a few dozen tokens (libtorrent's has ~15 keys).
EXT_MAX_DEPTH: Final = 4
EXT_MAX_TOKENS: Final = 2000
# Unparsed bytes a connection will hold: a full maximal message (a 256 KiB bitfield) plus
# a large socket read behind it. A caller that drains next_event() until NEED_DATA after
# each read never gets near it; one that keeps feeding without draining is stopped here.
DEFAULT_MAX_RECEIVE_BUFFER: Final = 1024 * 1024
# BEP 10 "reqq": libtorrent's default max_allowed_in_request_queue is 2000 (older: 250);
# we advertise this many outstanding requests unless told otherwise.
DEFAULT_REQQ: Final = 500

_U32: Final = 0xFFFFFFFF

_LEN: Final = struct.Struct(">I")
_HEADER: Final = struct.Struct(">IB")  # length prefix + message id
_HAVE: Final = struct.Struct(">IBI")
_REQUEST: Final = struct.Struct(">IBIII")  # also cancel
_PIECE_HEADER: Final = struct.Struct(">IBII")
_PORT: Final = struct.Struct(">IBH")
_EXTENDED_HEADER: Final = struct.Struct(">IBB")

KEEP_ALIVE_BYTES: Final = b"\x00\x00\x00\x00"
_NO_PAYLOAD: Final[dict[type[Message], bytes]] = {
    Choke: _HEADER.pack(1, MSG_CHOKE),
    Unchoke: _HEADER.pack(1, MSG_UNCHOKE),
    Interested: _HEADER.pack(1, MSG_INTERESTED),
    NotInterested: _HEADER.pack(1, MSG_NOT_INTERESTED),
}


def _u32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
        raise LocalProtocolError(f"{name} must be an integer in 0..2^32-1, not {value!r}")
    return value


def build_handshake(info_hash: bytes, peer_id: bytes, *, extensions: bool) -> bytes:
    """The 68-byte BEP 3 handshake, with the BEP 10 bit when ``extensions``."""
    check_id("info_hash", info_hash)
    check_id("peer_id", peer_id)
    reserved = bytearray(8)
    if extensions:
        reserved[EXTENSION_BIT_BYTE] |= EXTENSION_BIT_MASK
    return HANDSHAKE_PREFIX + bytes(reserved) + info_hash + peer_id


def check_id(name: str, value: bytes, length: int = 20) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise LocalProtocolError(f"{name} must be {length} bytes")


def handshake_context(
    *,
    info_hash: bytes,
    initiator_peer_id: bytes,
    responder_peer_id: bytes,
    initiator_nonce: bytes,
    responder_nonce: bytes,
    initiator_kx: bytes,
    responder_kx: bytes,
    encrypted: bool = True,
) -> bytes:
    """What both sides saw of the key exchange, in a fixed layout: the input of the key
    derivation and the body of both auth transcripts.

    ``info_hash (20) || initiator peer id (20) || responder peer id (20) || initiator
    nonce (32) || responder nonce (32) || initiator kx (32) || responder kx (32) || mode
    (1: b"E" encrypted after authentication, b"P" plain)``. Every field has a fixed length,
    so the concatenation is unambiguous.
    """
    check_id("info_hash", info_hash)
    check_id("initiator_peer_id", initiator_peer_id)
    check_id("responder_peer_id", responder_peer_id)
    check_id("initiator_nonce", initiator_nonce, NONCE_LENGTH)
    check_id("responder_nonce", responder_nonce, NONCE_LENGTH)
    check_id("initiator_kx", initiator_kx, KX_LENGTH)
    check_id("responder_kx", responder_kx, KX_LENGTH)
    return b"".join(
        (
            info_hash,
            initiator_peer_id,
            responder_peer_id,
            initiator_nonce,
            responder_nonce,
            initiator_kx,
            responder_kx,
            b"E" if encrypted else b"P",
        )
    )


def auth_transcript(*, signer: Role, context: bytes) -> bytes:
    """The bytes a side signs in its auth message: ``TRANSCRIPT_LABEL || role tag (b"I"
    or b"R", the signer) || handshake_context(...)``.

    The role tag means a signature cannot be reflected back to its signer; the context
    holds both nonces (fresh per connection: no replay), both peer ids, the info-hash and
    both key-exchange keys (a man in the middle who swaps a key breaks both signatures).
    """
    if signer not in _ROLE_TAG:
        raise LocalProtocolError("signer must be a Role")
    return TRANSCRIPT_LABEL + _ROLE_TAG[signer] + context


def build_extended(extended_id: int, payload: bytes) -> bytes:
    if isinstance(extended_id, bool) or not isinstance(extended_id, int):
        raise LocalProtocolError("extended_id must be an int")
    if not 0 <= extended_id <= 255:
        raise LocalProtocolError("extended_id must be in 0..255")
    return _EXTENDED_HEADER.pack(2 + len(payload), MSG_EXTENDED, extended_id) + payload


def build_extended_handshake(
    extensions: Mapping[bytes, int],
    *,
    client: bytes | None,
    reqq: int | None,
    nonce: bytes | None,
    kx: bytes | None = None,
    plain: bool = False,
    max_block: int | None = None,
    listen_port: int | None = None,
) -> bytes:
    payload: dict[bytes, Bencodable] = {b"m": dict(extensions)}
    if listen_port is not None:
        payload[LISTEN_PORT_KEY] = listen_port
    if client is not None:
        payload[b"v"] = client
    if reqq is not None:
        payload[b"reqq"] = reqq
    if nonce is not None:
        payload[NONCE_KEY] = nonce
    if kx is not None:
        payload[KX_KEY] = kx
    if plain:
        payload[PLAIN_KEY] = 1
    if max_block is not None:
        payload[BLOCK_LENGTH_KEY] = max_block
    return build_extended(EXT_HANDSHAKE_ID, bencode(payload))


def build_auth(extended_id: int, token: bytes, signature: bytes) -> bytes:
    return build_extended(extended_id, bencode({b"sig": signature, b"token": token}))


def build_haves_payload(indexes: list[int]) -> bytes:
    """The payload of a ``p2pimage_haves`` message (send it as an ``Extended``)."""
    for index in indexes:
        _u32("index", index)
    return struct.pack(f">{len(indexes)}I", *indexes)


def decode_haves(payload: bytes, num_pieces: int) -> tuple[int, ...]:
    """The piece indexes of a received ``p2pimage_haves`` payload; garbage (empty, not a
    multiple of 4, an index beyond ``num_pieces``) raises :class:`RemoteProtocolError`."""
    if not payload or len(payload) % 4:
        raise RemoteProtocolError(f"p2pimage_haves payload of {len(payload)} bytes")
    indexes: tuple[int, ...] = struct.unpack(f">{len(payload) // 4}I", payload)
    if max(indexes) >= num_pieces:
        raise RemoteProtocolError(f"p2pimage_haves index {max(indexes)} >= {num_pieces}")
    return indexes


def piece_header(index: int, begin: int, length: int) -> bytes:
    """The 13-byte header of a piece message carrying ``length`` bytes of block data."""
    _u32("index", index)
    _u32("begin", begin)
    if not 0 < length <= MAX_BLOCK_LENGTH_LIMIT:
        raise LocalProtocolError(f"block length {length} out of range")
    return _PIECE_HEADER.pack(9 + length, MSG_PIECE, index, begin)


def _encode_have(m: Any) -> bytes:
    return _HAVE.pack(5, MSG_HAVE, _u32("index", m.index))


def _encode_bitfield(m: Any) -> bytes:
    bits = m.bitfield
    if not isinstance(bits, bytes) or not bits:
        raise LocalProtocolError("bitfield must be non-empty bytes")
    return _HEADER.pack(1 + len(bits), MSG_BITFIELD) + bits


def _encode_request(m: Any) -> bytes:
    msg_id = MSG_REQUEST if isinstance(m, Request) else MSG_CANCEL
    return _REQUEST.pack(
        13, msg_id, _u32("index", m.index), _u32("begin", m.begin), _u32("length", m.length)
    )


def _encode_piece(m: Any) -> bytes:
    data = m.data
    return piece_header(m.index, m.begin, len(data)) + data  # type: ignore[no-any-return]


def _encode_port(m: Any) -> bytes:
    port = m.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError("port must be in 0..65535")
    return _PORT.pack(3, MSG_PORT, port)


def _encode_extended(m: Any) -> bytes:
    if not isinstance(m.payload, bytes):
        raise LocalProtocolError("extended payload must be bytes")
    return build_extended(m.extended_id, m.payload)


def _constant(encoded: bytes) -> Callable[[Any], bytes]:
    return lambda _m: encoded


ENCODERS: Final[dict[type[Message], Callable[[Any], bytes]]] = {
    KeepAlive: _constant(KEEP_ALIVE_BYTES),
    **{t: _constant(b) for t, b in _NO_PAYLOAD.items()},
    Have: _encode_have,
    Bitfield: _encode_bitfield,
    Request: _encode_request,
    Cancel: _encode_request,
    Piece: _encode_piece,
    Port: _encode_port,
    Extended: _encode_extended,
}


def encode_message(message: Message) -> bytes:
    """Encode one BEP 3/BEP 10 message without any state checks (see PeerConnection.send)."""
    encoder = ENCODERS.get(type(message))
    if encoder is None:
        raise LocalProtocolError(f"cannot send {type(message).__name__}")
    return encoder(message)
