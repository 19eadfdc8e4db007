"""BEP 3 single-file torrents for OCI blobs: codec, piece-length policy and one-pass creation.

A p2pimage torrent describes exactly one blob. Its info dictionary carries the usual BEP 3
keys (``length``, ``name``, ``piece length``, ``pieces``) plus ``sha256``: the blob's OCI
digest as 32 raw bytes. Because ``sha256`` sits *inside* the info dictionary, the info-hash
binds the digest: two torrents for different blobs can never share a swarm, and a peer
cannot swap the digest without changing the swarm it joins. Stock clients ignore the extra
key but hash it, so libtorrent computes the same info-hash.

:meth:`Metainfo.from_bytes` is h11-shaped: bytes in, a value or a
:class:`~p2pimage.errors.MetainfoError` out, never any other exception.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from p2pimage.errors import BencodeError, DigestMismatchError, LocalProtocolError, MetainfoError
from p2pimage.metainfo.bencoding import Bencodable, bdecode, bencode
from p2pimage.wire import BLOCK_LENGTH, MAX_BLOCK_LENGTH_LIMIT

__all__ = [
    "MAX_PIECE_LENGTH",
    "MAX_TORRENT_BYTES",
    "MIN_PIECES",
    "MIN_PIECE_LENGTH",
    "Metainfo",
    "MetainfoBuilder",
    "PREFERRED_PIECE_LENGTH",
    "TARGET_MAX_PIECES",
    "choose_piece_length",
    "create_metainfo_from_file",
    "is_digest",
    "parse_digest",
]

# One BitTorrent block: a smaller piece would hold less than one request, and libtorrent
# refuses piece lengths below it.
MIN_PIECE_LENGTH = BLOCK_LENGTH
# 16 MiB bounds what the piece store assembles in memory per piece in progress (it hashes
# a whole piece before it touches disk) and the unit a peer must re-send after a bad hash.
# Torrents with larger pieces are refused when read, for the same reason.
MAX_PIECE_LENGTH = 16 * 1024 * 1024
# The piece length a layer gets when it is large enough: one whole-piece block between
# p2pimage peers (MAX_BLOCK_LENGTH_LIMIT), so each piece costs one request, one piece
# message, one have per peer, one hash and one write. Haves, requests, picker and storage
# work all scale with the piece count, and in Python that per-message work, not hashing
# or copying, is most of a node's CPU: 256 KiB pieces cost 30-35 % less CPU per
# delivered MiB than 32 KiB ones in the 16-node swarm benchmark (docs/benchmarks.md,
# "Piece length"). Stock clients still request 16 KiB parts of it (BEP 3 allows any
# power of two; libtorrent's own create_torrent picks 256 KiB+ for most sizes).
PREFERRED_PIECE_LENGTH = MAX_BLOCK_LENGTH_LIMIT
# The fewest pieces a layer is cut into while pieces can still shrink (down to
# MIN_PIECE_LENGTH): layers under 64 MiB get smaller pieces, 256-511 of them (a 16 MiB
# layer: 256 of 64 KiB; 32 MiB: 256 of 128 KiB). A swarm that must keep up with the
# registry forwards each piece only once it is whole, so a piece is the unit of delay
# at every hop: with 64 pieces (256 KiB for 16 MiB) 32 nodes at 4 MiB/s finished at
# 2.2-2.3x the bound, with 256 (64 KiB) at 1.58-1.59x, for ~35 % more CPU per MiB
# (libtorrent, given the same torrent, pays as much more); 16 nodes x 32 MiB at 8 MiB/s
# went from 1.35x to 1.25-1.26x with 128 KiB pieces (docs/benchmarks.md, "Piece length").
# Layers of 64 MiB and more keep 256 KiB pieces; a 1 MiB layer still has 64 of 16 KiB.
MIN_PIECES = 256
# The most pieces a large layer is cut into before pieces grow past the preferred
# length (up to MAX_PIECE_LENGTH): 1,000-2,000 pieces, the usual target of libtorrent's
# create_torrent and mktorrent (~1,500), keep the piece list (20 bytes each), the
# bitfield and the per-piece bookkeeping small.
TARGET_MAX_PIECES = 2000
# The largest .torrent the sidecar keeps and a node accepts: 20 bytes a piece, 8 MiB hold
# ~400,000 pieces (a 6 GiB layer at the smallest piece length); automatic piece lengths
# keep real torrents at tens of KiB. It bounds what a broken store or sidecar makes us read.
MAX_TORRENT_BYTES = 8 * 1024 * 1024

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_INFO_KEYS = frozenset({b"length", b"name", b"piece length", b"pieces", b"sha256"})
# Files read in this unit: far above hashlib's 2 KiB GIL-release threshold, and small
# enough to stay in the CPU cache hierarchy's outer levels.
_READ_CHUNK = 4 * 1024 * 1024


def choose_piece_length(size: int) -> int:
    """The sidecar's piece length for a blob of ``size`` bytes: a power of two.

    ``PREFERRED_PIECE_LENGTH`` (256 KiB) for blobs of 64-500 MiB; smaller blobs get
    smaller pieces so that they still have ``MIN_PIECES`` (256) to 511 pieces, down to
    ``MIN_PIECE_LENGTH`` (blobs under 8 MiB: 1-510 pieces of 16 KiB); larger blobs get
    larger pieces so that they have at most ``TARGET_MAX_PIECES`` (2,000), up to
    ``MAX_PIECE_LENGTH`` (blobs over ~32 GiB have more).
    """
    if size < 0:
        raise LocalProtocolError("size must not be negative")
    piece_length = MIN_PIECE_LENGTH
    while piece_length < PREFERRED_PIECE_LENGTH and -(-size // (2 * piece_length)) >= MIN_PIECES:
        piece_length *= 2
    while piece_length < MAX_PIECE_LENGTH and -(-size // piece_length) > TARGET_MAX_PIECES:
        piece_length *= 2
    return piece_length


def is_digest(text: object) -> bool:
    """True for a canonical OCI ``sha256:<64 lowercase hex>`` digest, the only kind
    p2pimage serves; nothing else (no other algorithm, case or trailing newline)."""
    return isinstance(text, str) and _DIGEST_RE.fullmatch(text) is not None


def parse_digest(digest: str) -> bytes:
    """The 32 raw bytes of an OCI ``sha256:<64 lowercase hex>`` digest.

    Raises :class:`LocalProtocolError` for any other spelling.
    """
    match = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise LocalProtocolError(f"not a sha256 digest: {digest!r}")
    return bytes.fromhex(match.group(1))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_name(name: str) -> str | None:
    if not name:
        return "name is empty"
    if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        return f"name {name!r} is not a plain file name"
    return None


@dataclass(frozen=True)
class Metainfo:
    """One single-file torrent. Construct with :class:`MetainfoBuilder` or :meth:`from_bytes`.

    Direct construction validates the fields and raises :class:`LocalProtocolError`.
    """

    name: str
    length: int
    piece_length: int
    pieces: tuple[bytes, ...]
    sha256: str
    announce: str | None = None

    def __post_init__(self) -> None:
        problem = _field_problem(
            self.name, self.length, self.piece_length, self.pieces, self.sha256, self.announce
        )
        if problem is not None:
            raise LocalProtocolError(problem)

    @property
    def sha256_bytes(self) -> bytes:
        """The digest's 32 raw bytes (as stored in the info dictionary)."""
        return bytes.fromhex(self.sha256[len("sha256:") :])

    @property
    def digest_hex(self) -> str:
        """The digest's 64 hex characters, without the ``sha256:`` prefix."""
        return self.sha256[len("sha256:") :]

    @property
    def num_pieces(self) -> int:
        return len(self.pieces)

    def piece_size(self, index: int) -> int:
        """Bytes in piece ``index``: ``piece_length`` except for a shorter last piece."""
        self._check_index(index)
        return min(self.piece_length, self.length - index * self.piece_length)

    def piece_offset(self, index: int) -> int:
        """Offset of piece ``index``'s first byte in the blob."""
        self._check_index(index)
        return index * self.piece_length

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.pieces):
            raise LocalProtocolError(f"piece index {index} out of range 0..{len(self.pieces)}")

    def info_dict(self) -> dict[bytes, Bencodable]:
        return {
            b"length": self.length,
            b"name": self.name.encode(),
            b"piece length": self.piece_length,
            b"pieces": b"".join(self.pieces),
            b"sha256": self.sha256_bytes,
        }

    @cached_property
    def info_hash(self) -> bytes:
        """SHA-1 of the bencoded info dictionary (20 bytes): the swarm's identity."""
        return hashlib.sha1(bencode(self.info_dict())).digest()

    def to_bytes(self) -> bytes:
        """The canonical bencoded ``.torrent`` file."""
        top: dict[bytes, Bencodable] = {b"info": self.info_dict()}
        if self.announce is not None:
            top[b"announce"] = self.announce.encode()
        return bencode(top)

    @classmethod
    def from_bytes(cls, data: bytes) -> Metainfo:
        """Parse a ``.torrent`` strictly; anything else raises :class:`MetainfoError` only.

        Requires canonical bencoding, a single-file info dictionary with exactly the keys
        p2pimage writes (unknown info keys would change the info-hash without being
        carried), consistent piece count, a power-of-two piece length in
        [``MIN_PIECE_LENGTH``, ``MAX_PIECE_LENGTH``] and the 32-byte ``sha256``. Unknown
        keys outside ``info`` are ignored.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError("from_bytes takes bytes")
        try:
            top = bdecode(bytes(data))
        except BencodeError as exc:
            raise MetainfoError(f"not a torrent: {exc}") from None
        if not isinstance(top, dict):
            raise MetainfoError("torrent is not a dictionary")
        info = top.get(b"info")
        if not isinstance(info, dict):
            raise MetainfoError("missing info dictionary")
        if b"files" in info:
            raise MetainfoError("multi-file torrents are not supported")
        unknown = set(info) - _INFO_KEYS
        if unknown:
            raise MetainfoError(f"unknown info keys: {sorted(unknown)!r}")
        length = info.get(b"length")
        raw_name = info.get(b"name")
        piece_length = info.get(b"piece length")
        pieces = info.get(b"pieces")
        sha256 = info.get(b"sha256")
        announce = top.get(b"announce")
        if not isinstance(length, int):
            raise MetainfoError("length missing or not an integer")
        if not isinstance(piece_length, int):
            raise MetainfoError("piece length missing or not an integer")
        if not isinstance(raw_name, bytes):
            raise MetainfoError("name missing or not a string")
        if not isinstance(pieces, bytes) or len(pieces) % 20:
            raise MetainfoError("pieces missing or not a multiple of 20 bytes")
        if not isinstance(sha256, bytes) or len(sha256) != 32:
            raise MetainfoError("sha256 missing or not 32 bytes")
        if announce is not None and not isinstance(announce, bytes):
            raise MetainfoError("announce is not a string")
        try:
            name = raw_name.decode()
            announce_str = announce.decode() if announce is not None else None
        except UnicodeDecodeError:
            raise MetainfoError("name or announce is not UTF-8") from None
        hashes = tuple(pieces[i : i + 20] for i in range(0, len(pieces), 20))
        digest = "sha256:" + sha256.hex()
        problem = _field_problem(name, length, piece_length, hashes, digest, announce_str)
        if problem is not None:
            raise MetainfoError(problem)
        return cls(name, length, piece_length, hashes, digest, announce_str)


def _field_problem(
    name: object,
    length: object,
    piece_length: object,
    pieces: object,
    sha256: object,
    announce: object,
) -> str | None:
    """What is wrong with these fields, or None. Shared by construction and parsing."""
    if not isinstance(name, str):
        return "name must be a str"
    name_problem = _check_name(name)
    if name_problem is not None:
        return name_problem
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        return f"length must be a positive integer, not {length!r}"
    if (
        isinstance(piece_length, bool)
        or not isinstance(piece_length, int)
        or not _is_power_of_two(piece_length)
        or not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH
    ):
        return (
            f"piece length {piece_length!r} is not a power of two in "
            f"[{MIN_PIECE_LENGTH}, {MAX_PIECE_LENGTH}]"
        )
    if not isinstance(pieces, tuple) or not all(
        isinstance(p, bytes) and len(p) == 20 for p in pieces
    ):
        return "pieces must be a tuple of 20-byte SHA-1 digests"
    expected = -(-length // piece_length)
    if len(pieces) != expected:
        return f"{len(pieces)} piece hashes for {expected} pieces"
    if not isinstance(sha256, str) or _DIGEST_RE.fullmatch(sha256) is None:
        return f"sha256 {sha256!r} is not a sha256:<64 hex> digest"
    if announce is not None and not isinstance(announce, str):
        return "announce must be a str or None"
    return None


class MetainfoBuilder:
    """Build a :class:`Metainfo` in one pass over a blob of known size.

    Feed the bytes in order with :meth:`update` (any chunk sizes), then call :meth:`finish`.
    Piece SHA-1s and the whole-blob SHA-256 are computed in the same pass. Each update
    hands hashlib whole slices (never per-byte work), and hashlib releases the GIL for
    buffers of 2 KiB and more, so ``await trio.to_thread.run_sync(builder.update, chunk)``
    hashes off the event loop in parallel with it (measured: loop ticks stay ~1 ms).
    Hand each thread hop 1 MiB or more: with 64 KiB chunks the hop, not the hashing,
    dominates (about 2.5x slower). Not thread-safe: one update at a time.
    """

    def __init__(self, size: int, name: str, piece_length: int | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise LocalProtocolError(f"size must be a positive integer, not {size!r}")
        if piece_length is None:
            piece_length = choose_piece_length(size)
        if not _is_power_of_two(piece_length) or not (
            MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH
        ):
            raise LocalProtocolError(
                f"piece length {piece_length} is not a power of two in "
                f"[{MIN_PIECE_LENGTH}, {MAX_PIECE_LENGTH}]"
            )
        problem = _check_name(name)
        if problem is not None:
            raise LocalProtocolError(problem)
        self.size = size
        self.name = name
        self.piece_length = piece_length
        self._received = 0
        self._sha256 = hashlib.sha256()
        self._piece = hashlib.sha1()
        self._piece_filled = 0
        self._pieces: list[bytes] = []
        self._finished = False

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._received

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the blob.

        Raises :class:`LocalProtocolError` if this would exceed the declared size.
        """
        view = self.accept(chunk)
        self.update_sha256(view)
        self.update_pieces(view)

    # The three steps of update(), public so a caller can run the two hashes on two
    # threads: accept() every chunk in order, then feed the returned views, in the same
    # order, to update_sha256() on one thread and update_pieces() on another (hashlib
    # releases the GIL, so the hashes overlap on two cores).

    def accept(self, chunk: bytes | bytearray | memoryview) -> memoryview:
        """Count the next chunk against the declared size; returns it as a byte view."""
        if self._finished:
            raise LocalProtocolError("builder already finished")
        view = memoryview(chunk).cast("B")
        if self._received + len(view) > self.size:
            raise LocalProtocolError(
                f"received {self._received + len(view)} bytes, more than the declared {self.size}"
            )
        self._received += len(view)
        return view

    def update_sha256(self, view: memoryview) -> None:
        """Feed an accepted view to the whole-blob SHA-256."""
        self._sha256.update(view)

    def update_pieces(self, view: memoryview) -> None:
        """Feed an accepted view to the piece SHA-1s."""
        n = len(view)
        pos = 0
        piece_length = self.piece_length
        while pos < n:
            take = min(n - pos, piece_length - self._piece_filled)
            self._piece.update(view[pos : pos + take])
            pos += take
            self._piece_filled += take
            if self._piece_filled == piece_length:
                self._pieces.append(self._piece.digest())
                self._piece = hashlib.sha1()
                self._piece_filled = 0

    def finish(self, expected_digest: str | None = None, announce: str | None = None) -> Metainfo:
        """The torrent for the bytes fed.

        Raises :class:`LocalProtocolError` if fewer bytes than the declared size were fed
        (or ``expected_digest`` is malformed), and :class:`DigestMismatchError` if the
        blob's SHA-256 differs from ``expected_digest``.
        """
        if self._finished:
            raise LocalProtocolError("builder already finished")
        if self._received != self.size:
            raise LocalProtocolError(
                f"received {self._received} bytes, declared size is {self.size}"
            )
        expected = parse_digest(expected_digest) if expected_digest is not None else None
        self._finished = True
        if self._piece_filled:
            self._pieces.append(self._piece.digest())
        actual = self._sha256.digest()
        if expected is not None and actual != expected:
            raise DigestMismatchError(
                f"blob sha256:{actual.hex()} does not match {expected_digest}"
            )
        return Metainfo(
            name=self.name,
            length=self.size,
            piece_length=self.piece_length,
            pieces=tuple(self._pieces),
            sha256="sha256:" + actual.hex(),
            announce=announce,
        )


def create_metainfo_from_file(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    piece_length: int | None = None,
    expected_digest: str | None = None,
    announce: str | None = None,
) -> Metainfo:
    """Hash a file in one pass and return its torrent (``name`` defaults to its base name)."""
    p = Path(path)
    size = p.stat().st_size
    builder = MetainfoBuilder(size, name if name is not None else p.name, piece_length)
    # SHA-256 of chunk k runs in a helper thread while this thread reads chunk k and hashes
    # its pieces: hashlib drops the GIL, so with a second core free the two hashes overlap
    # (the sum of SHA-1 and SHA-256 one after the other is ~1 GB/s on one core). Two
    # buffers alternate so the helper never sees a buffer being refilled.
    buffers = (bytearray(_READ_CHUNK), bytearray(_READ_CHUNK))
    pending: Future[None] | None = None
    with p.open("rb", buffering=0) as f, ThreadPoolExecutor(1) as pool:
        turn = 0
        while True:
            buf = buffers[turn]
            turn ^= 1
            n = f.readinto(buf)
            if pending is not None:
                pending.result()
                pending = None
            if not n:
                break
            view = builder.accept(memoryview(buf)[:n])
            pending = pool.submit(builder.update_sha256, view)
            builder.update_pieces(view)
    return builder.finish(expected_digest, announce=announce)
