"""Encryption of an authenticated peer connection (sans-I/O): key agreement and records.

Each side sends an ephemeral X25519 public key in its extended handshake
(``p2pimage_kx``), before any identity. The shared secret goes through HKDF-SHA256, with
the handshake context (both nonces, both peer ids, the info-hash, both keys) as its
info, into one AES-256-GCM key per direction; the auth messages that follow travel
encrypted and sign the same context, so the signatures that authenticate the peers also
authenticate the key exchange, and a man in the middle can neither swap the keys nor
read the tokens. Every byte a side sends after its extended handshake is framed in
records::

    record = length (4 bytes, big-endian: ciphertext + 16-byte tag) || AES-GCM(plaintext)

with the 4-byte length as associated data and a 96-bit nonce that counts the direction's
records from 0 (4 zero bytes, then a 64-bit counter). A record holds at most
:data:`MAX_RECORD_PLAINTEXT` bytes; a reordered, replayed, truncated or altered record
fails its tag.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pimage.errors import LocalProtocolError, RemoteProtocolError

from ._codec import KX_LENGTH
from ._events import Role

__all__ = [
    "KX_LENGTH",
    "MAX_RECORD_PLAINTEXT",
    "RECORD_OVERHEAD",
    "RecordReader",
    "RecordWriter",
    "derive_keys",
    "kx_public_key",
    "sealed_length",
]

# Large enough that sealing a 512 KiB write batch costs two AEAD calls, small enough
# that a record plus a socket read fits the connection's receive buffer (1 MiB).
MAX_RECORD_PLAINTEXT: Final = 256 * 1024
TAG_LENGTH: Final = 16
RECORD_OVERHEAD: Final = 4 + TAG_LENGTH
_KDF_INFO: Final = b"p2pimage-peer-enc/3\x00"
_LEN: Final = struct.Struct(">I")
_NONCE: Final = struct.Struct(">4xQ")


def sealed_length(size: int) -> int:
    """Bytes of the records that carry ``size`` plaintext bytes."""
    return size + -(-size // MAX_RECORD_PLAINTEXT) * RECORD_OVERHEAD


def kx_private_key(private: bytes) -> X25519PrivateKey:
    """The X25519 key object of a 32-byte private key (from a CSPRNG, one per connection):
    made once per connection, for its public key and then its exchange (~30 µs each
    time it is made from bytes)."""
    if not isinstance(private, bytes) or len(private) != KX_LENGTH:
        raise LocalProtocolError("the key-exchange key must be 32 random bytes")
    return X25519PrivateKey.from_private_bytes(private)


def kx_public_key(private: bytes | X25519PrivateKey) -> bytes:
    """The X25519 public key of a 32-byte private key, or of its key object."""
    key = private if isinstance(private, X25519PrivateKey) else kx_private_key(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_keys(
    *,
    our_role: Role,
    private: bytes | X25519PrivateKey,
    peer_public: bytes,
    context: bytes,
) -> tuple[bytes, bytes]:
    """(send key, receive key) for ``our_role``; ``context`` is
    :func:`~p2pimage.wire._codec.handshake_context`. A peer key of low order (an all-zero
    shared secret) raises :class:`RemoteProtocolError`."""
    key = private if isinstance(private, X25519PrivateKey) else kx_private_key(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise RemoteProtocolError("peer's key-exchange key is invalid") from None
    if shared == bytes(len(shared)):
        raise RemoteProtocolError("peer's key-exchange key is invalid")
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=None,
        info=_KDF_INFO + context,
    ).derive(shared)
    initiator_to_responder, responder_to_initiator = okm[:32], okm[32:]
    if our_role is Role.INITIATOR:
        return initiator_to_responder, responder_to_initiator
    return responder_to_initiator, initiator_to_responder


class RecordWriter:
    """Seals one direction's bytes into records."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, data: bytes | bytearray | memoryview) -> bytearray:
        """The records of ``data``, in one new buffer."""
        size = len(data)
        if 0 < size <= MAX_RECORD_PLAINTEXT and type(data) is not memoryview:
            # One record (a batch of control messages, most of a node's writes): one AEAD
            # call on ``data`` as it is, not the chunk-by-chunk in-place path.
            header = _LEN.pack(size + TAG_LENGTH)
            out = bytearray(header)
            out += self._aead.encrypt(_NONCE.pack(self._counter), data, header)
            self._counter += 1
            return out
        view = memoryview(data).cast("B")
        out = bytearray(sealed_length(len(view)))
        self.seal_into(out, (view,))
        return out

    def seal_into(
        self, out: bytearray | memoryview, chunks: Sequence[bytes | bytearray | memoryview]
    ) -> int:
        """Seal the concatenation of ``chunks`` (bytes-like of 1-byte items) into the
        start of ``out``; return the bytes written (:func:`sealed_length`). Each chunk is
        copied to its place in its record and the record encrypted there, in place: no
        joined plaintext, no ciphertext object per record, and a caller that keeps ``out``
        allocates nothing per batch (glibc gives freed 512 KiB buffers back to the kernel
        and faults them in again: sealing 512 KiB batches into new buffers costs
        0.7 ms/MiB here, into one reused buffer about a quarter of that). ``out`` must
        not be in flight: its first bytes are overwritten. Raises
        :class:`LocalProtocolError`, writing nothing, if the records do not fit."""
        left = sum(len(chunk) for chunk in chunks)
        if sealed_length(left) > len(out):
            raise LocalProtocolError(
                f"{sealed_length(left)} bytes of records do not fit a {len(out)}-byte buffer"
            )
        aead, counter = self._aead, self._counter
        with memoryview(out) as dest:
            record = 0  # where the current record starts in dest
            fill = 0  # where its next plaintext byte goes
            room = 0  # plaintext bytes it still takes
            length = 0
            for chunk in chunks:
                size = len(chunk)
                offset = 0
                while offset < size:
                    if not room:
                        length = room = min(left, MAX_RECORD_PLAINTEXT)
                        fill = record + 4
                    take = min(room, size - offset)
                    if take == size:
                        dest[fill : fill + take] = chunk
                    else:
                        with memoryview(chunk) as part:
                            dest[fill : fill + take] = part[offset : offset + take]
                    fill += take
                    offset += take
                    room -= take
                    left -= take
                    if not room:
                        # The record is complete (and still in cache): encrypt it.
                        header = _LEN.pack(length + TAG_LENGTH)
                        dest[record : record + 4] = header
                        body = dest[record + 4 : fill + TAG_LENGTH]
                        aead.encrypt_into(_NONCE.pack(counter), body[:length], header, body)
                        body.release()
                        counter += 1
                        record = fill + TAG_LENGTH
        self._counter = counter
        return record


class RecordReader:
    """Opens the other direction's records as their bytes arrive.

    With ``limit``, only that many records are opened; the bytes after them stay raw
    (:meth:`take_raw`): a peer that sends piece traffic in the clear encrypts only its
    auth message.
    """

    def __init__(self, key: bytes, *, limit: int | None = None) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self._raw = bytearray()
        self._limit = limit

    @property
    def exhausted(self) -> bool:
        """Whether ``limit`` records have been opened."""
        return self._limit is not None and self._counter >= self._limit

    def take_raw(self) -> bytes:
        """The received bytes not opened (after the limit), handed back to the caller."""
        out = bytes(self._raw)
        self._raw.clear()
        return out

    @property
    def pending(self) -> int:
        """Received bytes not yet opened (an incomplete record)."""
        return len(self._raw)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add received bytes (copied: the caller may reuse ``data``'s buffer); return
        the plaintext of every record now complete."""
        raw = self._raw
        if not raw and self._limit is None and len(data) > 4:
            # Exactly one whole record (a read of control messages, most of a node's
            # reads): opened from ``data`` itself, without passing through the buffer.
            length = _LEN.unpack_from(data)[0]
            if len(data) == 4 + length and TAG_LENGTH < length <= MAX_RECORD_PLAINTEXT + TAG_LENGTH:
                with memoryview(data) as view:
                    try:
                        plain = self._aead.decrypt(_NONCE.pack(self._counter), view[4:], view[:4])
                    except InvalidTag:
                        raise RemoteProtocolError(
                            "encrypted record failed authentication"
                        ) from None
                self._counter += 1
                return plain
        raw += data
        out: list[bytes] = []
        pos = 0
        while len(raw) - pos >= 4 and not self.exhausted:
            length = _LEN.unpack_from(raw, pos)[0]
            if not TAG_LENGTH < length <= MAX_RECORD_PLAINTEXT + TAG_LENGTH:
                raise RemoteProtocolError(f"encrypted record of {length} bytes")
            end = pos + 4 + length
            if len(raw) < end:
                break
            with memoryview(raw) as view:
                try:
                    out.append(
                        self._aead.decrypt(
                            _NONCE.pack(self._counter), view[pos + 4 : end], view[pos : pos + 4]
                        )
                    )
                except InvalidTag:
                    raise RemoteProtocolError("encrypted record failed authentication") from None
            self._counter += 1
            pos = end
        del raw[:pos]
        return b"".join(out)
