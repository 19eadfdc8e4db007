"""The peer wire connection: one object owns a connection's protocol state (sans-I/O).

No sockets, no clock, no randomness: the caller passes the nonce, the key-exchange key
and peer ids, feeds received bytes to :meth:`PeerConnection.receive_data`, pulls events
from :meth:`PeerConnection.next_event`, writes what :meth:`PeerConnection.send` returns
and, after every event, what :meth:`PeerConnection.data_to_send` returns (bytes the
protocol itself emits: handshake, extended handshake, the encrypted auth message).
Everything the caller writes after the connection is open goes through
:meth:`PeerConnection.seal` first (a no-op on a connection that does not encrypt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from p2pimage.errors import LocalProtocolError, ProtocolVersionError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bdecode

from . import _codec as c
from ._crypto import (
    RecordReader,
    RecordWriter,
    derive_keys,
    kx_private_key,
    kx_public_key,
    sealed_length,
)
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

if TYPE_CHECKING:
    from p2pimage.auth.tokens import NodeToken

__all__ = ["Authenticator", "PeerConnection"]

DEFAULT_CLIENT: Final = b"p2pimage/0.1"

_S = ConnectionState

_KEEP_ALIVE: Final = KeepAlive()
_SIMPLE: Final[dict[int, Message]] = {
    c.MSG_CHOKE: Choke(),
    c.MSG_UNCHOKE: Unchoke(),
    c.MSG_INTERESTED: Interested(),
    c.MSG_NOT_INTERESTED: NotInterested(),
}
_MESSAGE_NAMES: Final = {
    c.MSG_CHOKE: "choke",
    c.MSG_UNCHOKE: "unchoke",
    c.MSG_INTERESTED: "interested",
    c.MSG_NOT_INTERESTED: "not interested",
    c.MSG_HAVE: "have",
    c.MSG_BITFIELD: "bitfield",
    c.MSG_REQUEST: "request",
    c.MSG_PIECE: "piece",
    c.MSG_CANCEL: "cancel",
    c.MSG_PORT: "port",
    c.MSG_EXTENDED: "extended",
}


class Authenticator(Protocol):
    """What the connection needs from :class:`p2pimage.auth.tokens.PeerAuthenticator`."""

    def credentials(self, transcript: bytes) -> tuple[bytes, bytes]: ...

    def verify_peer(
        self, token: bytes, signature: bytes, transcript: bytes, info_hash: bytes, peer_id: bytes
    ) -> NodeToken: ...


class PeerConnection:
    """Protocol state of one BitTorrent peer connection, with optional JWT proof of possession.

    Authenticated mode (``authenticator=...``, ``nonce=...``, ``kx_key=...``; protocol
    version :data:`~p2pimage.wire._codec.PROTOCOL_VERSION`), key exchange first,
    identities second, responder last:

    1. handshake + BEP 10 extended handshake each way (nonce, ephemeral X25519 key; no
       identity). Both sides derive the AES-GCM keys from the handshake context (both
       nonces, both peer ids, the info-hash, both keys); every later byte is a record.
    2. the initiator's auth message (token + signature over :func:`auth_transcript`),
       encrypted. The responder verifies it (``PeerAuthenticated``, responder OPEN) and
       only then sends its own, encrypted; the initiator verifies that (initiator OPEN).

    A connector that never authenticates therefore never sees the responder's token, and
    no token ever crosses the wire in the clear. Before OPEN, ``send()`` raises
    :class:`LocalProtocolError` and any received message other than the next expected
    handshake step raises :class:`RemoteProtocolError`; a peer of another protocol
    version raises :class:`ProtocolVersionError`. After OPEN the caller passes every
    write through :meth:`seal`; decryption is internal. With ``encrypt=False`` piece
    traffic after authentication goes in the clear (the auth messages stay encrypted);
    both sides must agree, or the connection is refused.

    Open mode (``authenticator=None, open_mode=True``) is for stock clients only: the
    connection is OPEN right after the 68-byte handshakes; extended handshakes are optional.

    A RESPONDER learns the info-hash from the peer: ``next_event()`` returns
    :class:`HandshakeReceived`, and the caller must call ``accept()`` (it serves that
    torrent) or ``reject()`` before calling ``next_event()`` again.
    """

    def __init__(
        self,
        role: Role,
        *,
        peer_id: bytes,
        authenticator: Authenticator | None,
        nonce: bytes | None = None,
        kx_key: bytes | None = None,
        encrypt: bool = True,
        open_mode: bool = False,
        info_hash: bytes | None = None,
        num_pieces: int | None = None,
        extensions: Mapping[bytes, int] | None = None,
        client: bytes | None = DEFAULT_CLIENT,
        reqq: int | None = c.DEFAULT_REQQ,
        max_block_length: int = c.BLOCK_LENGTH,
        max_extended_length: int = c.DEFAULT_MAX_EXTENDED_LENGTH,
        max_receive_buffer: int = c.DEFAULT_MAX_RECEIVE_BUFFER,
        listen_port: int | None = None,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError("role must be Role.INITIATOR or Role.RESPONDER")
        c.check_id("peer_id", peer_id)
        if authenticator is None:
            if not open_mode:
                raise LocalProtocolError(
                    "authenticator is required; pass open_mode=True only to talk to stock "
                    "BitTorrent clients"
                )
            if nonce is not None or kx_key is not None:
                raise LocalProtocolError("open mode does not use a nonce or a key exchange")
        else:
            if open_mode:
                raise LocalProtocolError("open_mode=True and an authenticator exclude each other")
            if nonce is None:
                raise LocalProtocolError("authenticated mode needs a fresh 32-byte nonce")
            c.check_id("nonce", nonce, c.NONCE_LENGTH)
            if kx_key is None:
                raise LocalProtocolError(
                    "authenticated mode needs a fresh 32-byte key-exchange key (kx_key)"
                )
        if role is Role.INITIATOR:
            if info_hash is None:
                raise LocalProtocolError("an INITIATOR must know the info_hash")
            c.check_id("info_hash", info_hash)
        elif info_hash is not None:
            raise LocalProtocolError("a RESPONDER learns the info_hash from the peer's handshake")
        if not 0 < max_block_length <= c.MAX_BLOCK_LENGTH_LIMIT:
            raise LocalProtocolError(f"max_block_length must be in 1..{c.MAX_BLOCK_LENGTH_LIMIT}")
        if max_extended_length < 1024:
            raise LocalProtocolError("max_extended_length must be at least 1 KiB")
        if listen_port is not None and not 0 < listen_port <= 0xFFFF:
            raise LocalProtocolError(f"bad listen port {listen_port!r}")
        local_ext = dict(extensions or {})
        for name, ext_id in local_ext.items():
            if not isinstance(name, bytes) or not isinstance(ext_id, int):
                raise LocalProtocolError("extensions map bytes names to int ids")
            if not 1 <= ext_id <= 255 or name == c.AUTH_EXTENSION:
                raise LocalProtocolError(f"bad extension {name!r}: {ext_id}")
        if authenticator is not None:
            if c.LOCAL_AUTH_ID in local_ext.values():
                raise LocalProtocolError(f"extension id {c.LOCAL_AUTH_ID} is the auth extension")
            local_ext[c.AUTH_EXTENSION] = c.LOCAL_AUTH_ID
        if len(set(local_ext.values())) != len(local_ext):
            raise LocalProtocolError("extension ids must be distinct")

        self.our_role: Final = role
        self.their_role: Final = Role.RESPONDER if role is Role.INITIATOR else Role.INITIATOR
        self.our_peer_id: Final = peer_id
        self.max_block_length: Final = max_block_length
        self.max_extended_length: Final = max_extended_length
        self.max_receive_buffer: Final = max(max_receive_buffer, 2 * c.MAX_BITFIELD_LENGTH)
        self._auth = authenticator
        self._nonce = nonce
        self._kx_key = kx_private_key(kx_key) if kx_key is not None else None
        self._kx_public = kx_public_key(self._kx_key) if self._kx_key is not None else None
        self._encrypt = encrypt and authenticator is not None
        self._peer_kx: bytes | None = None
        self._context: bytes | None = None  # handshake_context(), once both keys are known
        # Both set once the peer's extended handshake is read: every byte after the
        # extended handshakes is a record (until OPEN only, with encrypt=False).
        self._writer: RecordWriter | None = None
        self._reader: RecordReader | None = None
        self._client = client
        self._reqq = reqq
        self._listen_port = listen_port
        self._local_ext = local_ext
        self._local_ext_ids = frozenset(local_ext.values())

        self._state = _S.AWAIT_HANDSHAKE
        self._info_hash = info_hash
        self._remote_peer_id: bytes | None = None
        self._peer_supports_ext = False
        self._peer_ext: dict[bytes, int] = {}
        self._peer_nonce: bytes | None = None
        self._peer_auth_id: int | None = None
        self._peer_token: NodeToken | None = None
        self._peer_reqq: int | None = None
        self._peer_max_block = c.BLOCK_LENGTH  # until its extended handshake says more
        self._num_pieces: int | None = None
        self._bitfield_length: int | None = None
        self._received_have_info = False  # a bitfield or have arrived: no bitfield after that
        self._sent_have_info = False

        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._closed_by_peer = False
        self._error: RemoteProtocolError | None = None
        self._outbox = bytearray()

        self._limits: dict[int, tuple[int, int]] = {}
        self._max_message_length = 0
        self.num_pieces = num_pieces  # also computes the per-message limits

        self._readers: dict[ConnectionState, Callable[[], Event | NeedData]] = {
            _S.AWAIT_HANDSHAKE: self._read_handshake,
            _S.AWAIT_EXT_HANDSHAKE: self._read_message,
            _S.AWAIT_AUTH: self._read_message,
            _S.OPEN: self._read_message,
        }
        self._extended_handlers: dict[ConnectionState, Callable[[int, int, int], Event]] = {
            _S.AWAIT_EXT_HANDSHAKE: self._on_extended_await_ext_handshake,
            _S.AWAIT_AUTH: self._on_extended_await_auth,
            _S.OPEN: self._on_extended_open,
        }

        if role is Role.INITIATOR:
            assert info_hash is not None
            self._outbox += c.build_handshake(info_hash, peer_id, extensions=True)
            if self._auth is not None:
                # Pipelined: a p2pimage peer must support BEP 10, so waiting for its
                # reserved bit would only cost a round trip.
                self._outbox += self._extended_handshake()

    # --- read-only state ------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def is_open(self) -> bool:
        """Whether BEP 3 messages (bitfield, have, piece...) may be sent and received."""
        return self._state is _S.OPEN

    @property
    def authenticated(self) -> bool:
        return self._auth is not None

    @property
    def encrypted(self) -> bool:
        """Whether piece traffic after authentication is encrypted (authenticated mode
        with ``encrypt``); :meth:`seal` must wrap every write once the connection is open."""
        return self._encrypt

    @property
    def info_hash(self) -> bytes | None:
        """The swarm: known up front (INITIATOR) or from the peer's handshake (RESPONDER)."""
        return self._info_hash

    @property
    def remote_peer_id(self) -> bytes | None:
        return self._remote_peer_id

    @property
    def peer_token(self) -> NodeToken | None:
        """The peer's verified node token (authenticated mode, once OPEN)."""
        return self._peer_token

    @property
    def peer_extensions(self) -> dict[bytes, int]:
        """The peer's BEP 10 ``m`` dictionary (name -> the id to send that extension with)."""
        return dict(self._peer_ext)

    @property
    def peer_reqq(self) -> int | None:
        return self._peer_reqq

    @property
    def peer_max_block_length(self) -> int:
        """The largest block the peer accepts (``p2pimage_block`` in its extended
        handshake; 16 KiB for stock clients): requests we send are checked against it."""
        return self._peer_max_block

    def peer_extension_id(self, name: bytes) -> int | None:
        return self._peer_ext.get(name)

    @property
    def num_pieces(self) -> int | None:
        return self._num_pieces

    @num_pieces.setter
    def num_pieces(self, value: int | None) -> None:
        """Once set, bitfield lengths and piece indexes are checked against it."""
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= c.MAX_PIECES
        ):
            raise LocalProtocolError(f"num_pieces must be in 1..{c.MAX_PIECES}")
        self._num_pieces = value
        self._bitfield_length = None if value is None else (value + 7) // 8
        bitfield_max = c.MAX_BITFIELD_LENGTH if value is None else (value + 7) // 8
        # (minimum, maximum) length prefix per message id; anything else is a protocol error.
        self._limits = {
            c.MSG_CHOKE: (1, 1),
            c.MSG_UNCHOKE: (1, 1),
            c.MSG_INTERESTED: (1, 1),
            c.MSG_NOT_INTERESTED: (1, 1),
            c.MSG_HAVE: (5, 5),
            c.MSG_BITFIELD: (2 if value is None else 1 + bitfield_max, 1 + bitfield_max),
            c.MSG_REQUEST: (13, 13),
            c.MSG_PIECE: (10, 9 + self.max_block_length),
            c.MSG_CANCEL: (13, 13),
            c.MSG_PORT: (3, 3),
            c.MSG_EXTENDED: (2, 2 + self.max_extended_length),
        }
        self._max_message_length = max(hi for _, hi in self._limits.values())

    # --- responder's decision -------------------------------------------------------------

    def accept(self, *, num_pieces: int | None = None) -> None:
        """RESPONDER: serve the info-hash of the :class:`HandshakeReceived` just returned.

        Queues our handshake (and extended handshake) in ``data_to_send()``.
        """
        if self.our_role is not Role.RESPONDER or self._state is not _S.AWAIT_ACCEPT:
            raise LocalProtocolError(f"accept() is for a RESPONDER in AWAIT_ACCEPT ({self._state})")
        assert self._info_hash is not None
        if num_pieces is not None:
            self.num_pieces = num_pieces
        self._outbox += c.build_handshake(self._info_hash, self.our_peer_id, extensions=True)
        if self._peer_supports_ext:
            self._outbox += self._extended_handshake()
        self._state = _S.AWAIT_EXT_HANDSHAKE if self._auth is not None else _S.OPEN

    def reject(self) -> None:
        """RESPONDER: we do not serve this info-hash; the caller closes the socket."""
        if self.our_role is not Role.RESPONDER or self._state is not _S.AWAIT_ACCEPT:
            raise LocalProtocolError(f"reject() is for a RESPONDER in AWAIT_ACCEPT ({self._state})")
        self.close()

    def close(self) -> None:
        """We are closing the connection; nothing more may be sent or received."""
        self._state = _S.CLOSED

    # --- output ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself must write (handshakes, the sealed auth message);
        check after each event. Written as they are: they are already sealed."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def seal(self, data: bytes | bytearray | memoryview) -> bytes | bytearray:
        """What to write for ``data`` (any run of :meth:`send` results, in order, and the
        block bytes after each :meth:`piece_header`): encrypted records on an encrypted
        connection, ``data`` itself otherwise. Allowed once OPEN. Pending protocol output
        (``data_to_send()``) comes first."""
        self._check_open("seal")
        if self._writer is None:
            return bytes(data)
        sealed = self._writer.seal(data)
        if self._outbox:
            self._outbox += sealed
            sealed, self._outbox = self._outbox, bytearray()
        return sealed

    def sealed_length(self, size: int) -> int:
        """Bytes :meth:`seal_into` writes for ``size`` bytes of chunks: their records (or
        the bytes themselves in the clear), after any pending protocol output."""
        self._check_open("seal")
        return len(self._outbox) + (size if self._writer is None else sealed_length(size))

    def seal_into(
        self, out: bytearray | memoryview, chunks: Sequence[bytes | bytearray | memoryview]
    ) -> int:
        """:meth:`seal` of the concatenation of ``chunks``, written into the start of
        ``out`` (a buffer the caller reuses: it must not be in flight); returns the bytes
        written. Raises :class:`LocalProtocolError`, consuming nothing, when they would
        not fit (:meth:`sealed_length`)."""
        need = self.sealed_length(sum(len(chunk) for chunk in chunks))
        if need > len(out):
            raise LocalProtocolError(f"{need} bytes to write do not fit a {len(out)}-byte buffer")
        pending = len(self._outbox)
        with memoryview(out) as dest:
            dest[:pending] = self._outbox
            self._outbox.clear()
            if self._writer is not None:
                return pending + self._writer.seal_into(dest[pending:], chunks)
            pos = pending
            for chunk in chunks:
                dest[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            return pos

    def send(self, message: Message) -> bytes:
        """Encode a caller-initiated message; allowed only when OPEN.

        The result starts with any pending ``data_to_send()`` bytes, so writing it keeps
        the stream in order even if the caller has not flushed the outbox.
        """
        self._check_open("send")
        kind = type(message)
        if kind is Piece:
            assert isinstance(message, Piece)
            return self.piece_header(message.index, message.begin, len(message.data)) + (
                message.data
            )
        if kind is Have:
            assert isinstance(message, Have)
            self._check_index(message.index)
            self._sent_have_info = True
        elif kind is Bitfield:
            assert isinstance(message, Bitfield)
            if self._sent_have_info:
                raise LocalProtocolError("a bitfield goes once, before any have")
            if not isinstance(message.bitfield, bytes):
                raise LocalProtocolError("bitfield must be bytes")
            if self._num_pieces is not None:
                self._check_bitfield(message.bitfield, LocalProtocolError)
            elif not 0 < len(message.bitfield) <= c.MAX_BITFIELD_LENGTH:
                raise LocalProtocolError("bitfield length out of range")
            self._sent_have_info = True
        elif kind is Request or kind is Cancel:
            assert isinstance(message, Request | Cancel)
            self._check_index(message.index)
            if not 0 < message.length <= self._peer_max_block:
                raise LocalProtocolError(f"block length {message.length} out of range")
        elif kind is Extended:
            assert isinstance(message, Extended)
            if message.extended_id not in self._peer_ext.values():
                raise LocalProtocolError(
                    f"peer did not advertise extension id {message.extended_id}"
                )
            if message.extended_id == self._peer_auth_id:
                raise LocalProtocolError("the auth message is sent by the protocol itself")
            if len(message.payload) > self.max_extended_length:
                raise LocalProtocolError("extended payload too large")
        encoded = c.encode_message(message)
        return self._flush_with(encoded)

    def piece_header(self, index: int, begin: int, length: int) -> bytes:
        """Fast path for serving a block: the piece message header (plus pending outbox).

        Write the result and then the ``length`` bytes of block data, so large blocks
        need not be concatenated into a new buffer.
        """
        self._check_open("send")
        self._check_index(index)
        if not 0 < length <= self.max_block_length:
            raise LocalProtocolError(f"block length {length} out of range")
        return self._flush_with(c.piece_header(index, begin, length))

    def _flush_with(self, encoded: bytes) -> bytes:
        # Pending protocol output goes first: here when the caller writes our result as
        # it is; in seal() when it is about to be sealed (the outbox is sealed already).
        if self._outbox and self._writer is None:
            encoded = bytes(self._outbox) + encoded
            self._outbox.clear()
        return encoded

    def _check_open(self, what: str) -> None:
        if self._state is not _S.OPEN:
            raise LocalProtocolError(f"cannot {what} in state {self._state.name}")

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise LocalProtocolError(f"bad piece index {index!r}")
        if self._num_pieces is not None and index >= self._num_pieces:
            raise LocalProtocolError(f"piece index {index} >= num_pieces {self._num_pieces}")

    def _extended_handshake(self) -> bytes:
        return c.build_extended_handshake(
            self._local_ext,
            client=self._client,
            reqq=self._reqq,
            nonce=self._nonce,
            kx=self._kx_public,
            plain=self._auth is not None and not self._encrypt,
            max_block=self.max_block_length if self.max_block_length > c.BLOCK_LENGTH else None,
            listen_port=self._listen_port,
        )

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the socket; ``b""`` means the peer closed (EOF). The bytes
        are copied in: the caller may reuse ``data``'s buffer for its next read."""
        if self._state is _S.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if not data:
            self._eof = True
            return
        if self._reader is not None:
            if self._reader.pending + len(data) > self.max_receive_buffer:
                raise LocalProtocolError(
                    "receive buffer full: drain next_event() until NEED_DATA before feeding more"
                )
            try:
                data = self._open_records(data)
            except RemoteProtocolError as exc:
                self._error = exc
                self._state = _S.CLOSED
                raise
            if not data:
                return
        buf = self._buf
        pos = self._pos
        if pos:
            # Compact occasionally: drop consumed bytes when they are most of the buffer.
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos >= 65536 or pos * 2 >= len(buf):
                del buf[:pos]
                self._pos = 0
        if len(buf) - self._pos + len(data) > self.max_receive_buffer:
            raise LocalProtocolError(
                "receive buffer full: drain next_event() until NEED_DATA before feeding more"
            )
        buf += data

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`. Garbage raises :class:`RemoteProtocolError`
        (and closes the connection); nothing else is raised for anything the peer sends."""
        state = self._state
        if state is _S.CLOSED:
            if self._error is not None:
                raise RemoteProtocolError(f"connection failed earlier: {self._error}")
            if self._closed_by_peer:
                return ConnectionClosed()
            raise LocalProtocolError("connection is closed")
        if state is _S.AWAIT_ACCEPT:
            raise LocalProtocolError("call accept() or reject() after HandshakeReceived")
        try:
            event = self._readers[state]()
            if event is NEED_DATA and self._eof:
                if self._pos != len(self._buf) or (self._reader and self._reader.pending):
                    raise RemoteProtocolError("connection closed in the middle of a message")
                self._state = _S.CLOSED
                self._closed_by_peer = True
                return ConnectionClosed()
            return event
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = _S.CLOSED
            raise

    # --- readers, keyed by state ----------------------------------------------------------

    def _read_handshake(self) -> Event | NeedData:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < c.HANDSHAKE_LENGTH:
            n = min(avail, len(c.HANDSHAKE_PREFIX))
            if buf[pos : pos + n] != c.HANDSHAKE_PREFIX[:n]:
                raise RemoteProtocolError("not a BitTorrent handshake")
            return NEED_DATA
        if buf[pos : pos + 20] != c.HANDSHAKE_PREFIX:
            raise RemoteProtocolError("not a BitTorrent handshake")
        reserved = bytes(buf[pos + 20 : pos + 28])
        info_hash = bytes(buf[pos + 28 : pos + 48])
        peer_id = bytes(buf[pos + 48 : pos + 68])
        self._pos = pos + c.HANDSHAKE_LENGTH
        self._peer_supports_ext = bool(reserved[c.EXTENSION_BIT_BYTE] & c.EXTENSION_BIT_MASK)
        if self._auth is not None and not self._peer_supports_ext:
            raise RemoteProtocolError("peer does not support BEP 10; authentication is required")
        self._remote_peer_id = peer_id
        if self.our_role is Role.INITIATOR:
            if info_hash != self._info_hash:
                raise RemoteProtocolError("peer answered with a different info-hash")
            if self._auth is not None:
                self._state = _S.AWAIT_EXT_HANDSHAKE
            else:
                if self._peer_supports_ext:
                    self._outbox += self._extended_handshake()
                self._state = _S.OPEN
        else:
            self._info_hash = info_hash
            self._state = _S.AWAIT_ACCEPT
        return HandshakeReceived(info_hash=info_hash, peer_id=peer_id, reserved=reserved)

    def _read_message(self) -> Event | NeedData:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 4:
            return NEED_DATA
        length = c._LEN.unpack_from(buf, pos)[0]
        if length == 0:
            if self._state is not _S.OPEN:
                raise RemoteProtocolError(self._not_yet("keep-alive"))
            self._pos = pos + 4
            return _KEEP_ALIVE
        if length > self._max_message_length:
            raise RemoteProtocolError(f"message of {length} bytes exceeds the limit")
        if avail < 5:
            return NEED_DATA
        msg_id = buf[pos + 4]
        limits = self._limits.get(msg_id)
        if limits is None:
            raise RemoteProtocolError(f"unknown message id {msg_id}")
        if not limits[0] <= length <= limits[1]:
            raise RemoteProtocolError(f"{_MESSAGE_NAMES[msg_id]} message with length {length}")
        if msg_id != c.MSG_EXTENDED and self._state is not _S.OPEN:
            raise RemoteProtocolError(self._not_yet(_MESSAGE_NAMES[msg_id]))
        end = pos + 4 + length
        if len(buf) < end:
            return NEED_DATA
        self._pos = end
        start = pos + 5
        if msg_id == c.MSG_PIECE:  # hot path first
            index, begin = c._PIECE_HEADER.unpack_from(buf, pos)[2:]
            self._check_remote_index(index)
            return Piece(index, begin, self._copy(start + 8, end))
        if msg_id == c.MSG_EXTENDED:
            return self._extended_handlers[self._state](buf[start], start + 1, end)
        simple = _SIMPLE.get(msg_id)
        if simple is not None:
            return simple
        if msg_id == c.MSG_HAVE:
            index = c._HAVE.unpack_from(buf, pos)[2]
            self._check_remote_index(index)
            self._received_have_info = True
            return Have(index)
        if msg_id == c.MSG_REQUEST or msg_id == c.MSG_CANCEL:
            index, begin, block = c._REQUEST.unpack_from(buf, pos)[2:]
            self._check_remote_index(index)
            if not 0 < block <= self.max_block_length:
                raise RemoteProtocolError(f"block length {block} out of range")
            return (
                Request(index, begin, block)
                if msg_id == c.MSG_REQUEST
                else Cancel(index, begin, block)
            )
        if msg_id == c.MSG_BITFIELD:
            # BEP 3 puts the bitfield first, but aria2 sends one late (after its first
            # haves) when it started with nothing: tolerated from stock clients (open
            # mode), where the newer bitfield replaces what we knew; p2pimage peers
            # never do it, so authenticated connections stay strict.
            if self._received_have_info and self._auth is not None:
                raise RemoteProtocolError("bitfield after a bitfield or have")
            bits = self._copy(start, end)
            if self._num_pieces is not None:
                self._check_bitfield(bits, RemoteProtocolError)
            self._received_have_info = True
            return Bitfield(bits)
        # MSG_PORT: the only id left in the limits table
        return Port(c._PORT.unpack_from(buf, pos)[2])

    def _copy(self, start: int, end: int) -> bytes:
        """Received bytes ``[start, end)`` as bytes: one copy through a view (a slice of
        the bytearray, then bytes(), would be two). The view is released at once, so the
        buffer stays resizable."""
        with memoryview(self._buf) as view:
            return bytes(view[start:end])

    def _not_yet(self, what: str) -> str:
        return f"peer sent {what} in state {self._state.name}, before authentication completed"

    def _check_remote_index(self, index: int) -> None:
        if self._num_pieces is not None and index >= self._num_pieces:
            raise RemoteProtocolError(f"piece index {index} >= num_pieces {self._num_pieces}")

    def _check_bitfield(self, bits: bytes, error: type[Exception]) -> None:
        assert self._num_pieces is not None and self._bitfield_length is not None
        if len(bits) != self._bitfield_length:
            raise error(f"bitfield of {len(bits)} bytes for {self._num_pieces} pieces")
        spare = self._bitfield_length * 8 - self._num_pieces
        if spare and bits[-1] & ((1 << spare) - 1):
            raise error("bitfield has spare bits set")

    # --- extended messages, keyed by state -------------------------------------------------

    def _on_extended_await_ext_handshake(self, ext_id: int, start: int, end: int) -> Event:
        if ext_id != c.EXT_HANDSHAKE_ID:
            raise RemoteProtocolError(
                f"peer sent extended message {ext_id} before its extended handshake"
            )
        event = self._parse_extended_handshake(start, end)
        auth_id = event.extensions.get(c.AUTH_EXTENSION)
        if auth_id is None:
            versions = [c.auth_extension_version(name) for name in event.extensions]
            known = sorted(v for v in versions if v is not None and v != c.PROTOCOL_VERSION)
            if known:
                raise ProtocolVersionError(known[-1], c.PROTOCOL_VERSION)
            raise RemoteProtocolError(
                f"peer does not advertise the {c.AUTH_EXTENSION.decode()} extension"
            )
        nonce = event.payload.get(c.NONCE_KEY)
        if not isinstance(nonce, bytes) or len(nonce) != c.NONCE_LENGTH:
            raise RemoteProtocolError("peer's extended handshake lacks a 32-byte nonce")
        if nonce == self._nonce:
            raise RemoteProtocolError("peer echoed our nonce")
        peer_kx = event.payload.get(c.KX_KEY)
        if not isinstance(peer_kx, bytes) or len(peer_kx) != c.KX_LENGTH:
            raise RemoteProtocolError("peer's extended handshake lacks a 32-byte key-exchange key")
        peer_plain = event.payload.get(c.PLAIN_KEY, 0) != 0
        if peer_plain and self._encrypt:
            raise RemoteProtocolError("peer does not offer encryption, which we require")
        if not peer_plain and not self._encrypt:
            raise RemoteProtocolError(
                "peer encrypts piece traffic and we do not (peer_encryption must agree)"
            )
        self._peer_nonce = nonce
        self._peer_auth_id = auth_id
        self._peer_kx = peer_kx
        assert self._kx_key is not None and self._nonce is not None
        assert self._info_hash is not None and self._remote_peer_id is not None
        ids = self._by_role(self.our_peer_id, self._remote_peer_id)
        nonces = self._by_role(self._nonce, nonce)
        initiator_kx, responder_kx = self._kx_pair()
        self._context = c.handshake_context(
            info_hash=self._info_hash,
            initiator_peer_id=ids[0],
            responder_peer_id=ids[1],
            initiator_nonce=nonces[0],
            responder_nonce=nonces[1],
            initiator_kx=initiator_kx,
            responder_kx=responder_kx,
            encrypted=self._encrypt,
        )
        send_key, receive_key = derive_keys(
            our_role=self.our_role,
            private=self._kx_key,
            peer_public=peer_kx,
            context=self._context,
        )
        self._writer = RecordWriter(send_key)
        # Without encryption after OPEN, the peer's auth message is its only record.
        self._reader = RecordReader(receive_key, limit=None if self._encrypt else 1)
        rest = bytes(self._buf[self._pos :])
        del self._buf[self._pos :]
        if rest:
            self._buf += self._open_records(rest)
        if self.our_role is Role.INITIATOR:
            self._queue_auth()  # the responder answers with its own only once it has verified us
        self._state = _S.AWAIT_AUTH
        return event

    def _on_extended_await_auth(self, ext_id: int, start: int, end: int) -> Event:
        if ext_id == c.EXT_HANDSHAKE_ID:
            raise RemoteProtocolError("peer sent a second extended handshake before auth")
        if ext_id != c.LOCAL_AUTH_ID:
            raise RemoteProtocolError(f"peer sent extended message {ext_id} before its auth")
        payload = self._decode_dict(start, end, "auth message")
        token = payload.get(b"token")
        signature = payload.get(b"sig")
        if not isinstance(token, bytes) or not 0 < len(token) <= c.MAX_AUTH_TOKEN_LENGTH:
            raise RemoteProtocolError("auth message lacks a token")
        if not isinstance(signature, bytes) or not 0 < len(signature) <= (
            c.MAX_AUTH_SIGNATURE_LENGTH
        ):
            raise RemoteProtocolError("auth message lacks a signature")
        assert self._auth is not None and self._info_hash is not None
        assert self._remote_peer_id is not None
        verified = self._auth.verify_peer(
            token,
            signature,
            self._transcript(self.their_role),
            self._info_hash,
            self._remote_peer_id,
        )
        self._peer_token = verified
        if self.our_role is Role.RESPONDER:
            self._queue_auth()
        if not self._encrypt:
            self._writer = None  # piece traffic in the clear from here on
        self._state = _S.OPEN
        return PeerAuthenticated(verified)

    def _queue_auth(self) -> None:
        assert self._auth is not None and self._writer is not None
        assert self._peer_auth_id is not None
        token, signature = self._auth.credentials(self._transcript(self.our_role))
        self._outbox += self._writer.seal(c.build_auth(self._peer_auth_id, token, signature))

    def _open_records(self, data: bytes | bytearray | memoryview) -> bytes:
        """Received bytes, decrypted; with a record limit reached, the reader steps aside."""
        reader = self._reader
        assert reader is not None
        plain = reader.feed(data)
        if reader.exhausted:
            self._reader = None
            plain += reader.take_raw()
        return plain

    def _on_extended_open(self, ext_id: int, start: int, end: int) -> Event:
        if ext_id == c.EXT_HANDSHAKE_ID:
            # BEP 10 lets a peer re-send its handshake to update "m"; auth state is settled.
            return self._parse_extended_handshake(start, end)
        if ext_id == c.LOCAL_AUTH_ID and self._auth is not None:
            raise RemoteProtocolError("peer sent a second auth message")
        if ext_id not in self._local_ext_ids:
            raise RemoteProtocolError(f"extended message {ext_id} is not an id we advertised")
        return Extended(ext_id, self._copy(start, end))

    def _decode_dict(self, start: int, end: int, what: str) -> dict[bytes, Any]:
        value = bdecode(
            self._copy(start, end),
            max_size=self.max_extended_length,
            max_depth=c.EXT_MAX_DEPTH,
            max_tokens=c.EXT_MAX_TOKENS,
        )
        if not isinstance(value, dict):
            raise RemoteProtocolError(f"{what} is not a dictionary")
        return value

    def _parse_extended_handshake(self, start: int, end: int) -> ExtendedHandshake:
        payload = self._decode_dict(start, end, "extended handshake")
        m = payload.get(b"m", {})
        if not isinstance(m, dict):
            raise RemoteProtocolError("extended handshake 'm' is not a dictionary")
        extensions: dict[bytes, int] = {}
        for name, ext_id in m.items():
            if not isinstance(ext_id, int) or not 0 <= ext_id <= 255:
                raise RemoteProtocolError(f"extension {name!r} has a bad id")
            if ext_id:  # BEP 10: id 0 means "disabled"
                extensions[name] = ext_id
        client = payload.get(b"v")
        reqq = payload.get(b"reqq")
        port = payload.get(c.LISTEN_PORT_KEY)
        event = ExtendedHandshake(
            extensions=extensions,
            client=client if isinstance(client, bytes) else None,
            reqq=reqq if isinstance(reqq, int) and reqq > 0 else None,
            payload=payload,
            # Advisory (BEP 10): a value that is no TCP port is ignored, not refused.
            listen_port=(
                port
                if isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 0xFFFF
                else None
            ),
        )
        self._peer_ext = dict(extensions)
        if event.reqq is not None:
            self._peer_reqq = event.reqq
        max_block = payload.get(c.BLOCK_LENGTH_KEY)
        if isinstance(max_block, int) and not isinstance(max_block, bool):
            # Out-of-range values are clamped, not refused: the key can only raise the
            # BEP 3 default, and never beyond MAX_BLOCK_LENGTH_LIMIT.
            self._peer_max_block = min(max(max_block, c.BLOCK_LENGTH), c.MAX_BLOCK_LENGTH_LIMIT)
        return event

    def _by_role(self, ours: bytes, theirs: bytes) -> tuple[bytes, bytes]:
        """(initiator's, responder's) of a pair of values, one of them ours."""
        return (ours, theirs) if self.our_role is Role.INITIATOR else (theirs, ours)

    def _kx_pair(self) -> tuple[bytes, bytes]:
        assert self._kx_public is not None and self._peer_kx is not None
        return self._by_role(self._kx_public, self._peer_kx)

    def _transcript(self, signer: Role) -> bytes:
        assert self._context is not None
        return c.auth_transcript(signer=signer, context=self._context)
