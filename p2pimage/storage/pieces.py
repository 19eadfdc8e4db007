"""On-disk store of one blob's pieces: verify in memory, write, resume, stream, finalize.

Layout under ``root``, content-addressed by the blob's digest hex (the names are
:class:`~p2pimage.storage.layout.BlobFiles`'s):

- ``<hex>.partial`` — the blob being assembled, a sparse file truncated to its length;
- ``<hex>.state`` — the verified-piece bitfield and the info-hash it belongs to (bencoded),
  replaced atomically (temp file, fsync, ``os.replace``);
- ``<hex>`` — the finished blob, renamed from ``.partial`` only after its SHA-256 matched.

Pieces are assembled in memory and hashed before they touch disk, so a bad piece never
lands. The state file is flushed in batches (every ``flush_every_bytes`` of newly verified
pieces, on :meth:`PieceStorage.flush` and on :meth:`PieceStorage.close`). It does not wait
for the data it describes to reach the disk (measured here on ext4, 16 KiB blocks into a
256 MiB blob: ~200 MiB/s with an fsync of the partial file per 64 MiB batch, ~550 MiB/s
without; a state-only flush costs 3-12 ms); instead :meth:`PieceStorage.open`
re-hashes every piece the state claims and keeps only those that still verify. So a crash
loses at most the last batch of verified pieces plus any whose bytes had not reached the
disk, and never trusts a piece it cannot read back. The blob itself is fsynced before its
rename to the final name.

Peer blocks and whole pieces (the origin's) take one path in: :meth:`PieceStorage.write_block`
(:meth:`PieceStorage.write_piece` is that call for a whole piece). A block the store will
not buffer now raises :class:`~p2pimage.errors.StorageBusyError`: back-pressure, not a fault.

Completion is explicit: when :attr:`PieceStorage.all_pieces_verified` turns true, call
``await finalize()`` (hashes the file in a worker thread) or ``finalize_sync()``. Readers
do not wait for it: :meth:`PieceStorage.stream` yields bytes as soon as their pieces verify.

Thread use: methods are not thread-safe among themselves; any one of them may run in a
``trio.to_thread`` worker (wakeups of waiting readers are handed to the trio loop safely).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from types import TracebackType

import trio

from p2pimage.errors import (
    BencodeError,
    DigestMismatchError,
    LocalProtocolError,
    PieceHashError,
    StorageBusyError,
    StorageError,
)
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.layout import BlobFiles

__all__ = [
    "DEFAULT_FLUSH_EVERY_BYTES",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "BlobCursor",
    "PieceStorage",
]

# Memory for pieces being assembled. With metainfo's policy (256 KiB pieces, at most 2,000
# per blob), a 1 GiB layer has 1 MiB pieces, so 64 MiB holds 64 pieces in progress, more than the
# peers a node downloads one blob from at once (libtorrent's default unchoke slots: 8;
# connections per torrent: ~50 but few hold a piece each). Always at least one piece.
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
# A state write is a small file, an fsync and a rename; batching per 64 MiB keeps that
# under one per ~30 ms of transfer at 2 GB/s, and bounds what a crash re-fetches to 64 MiB.
DEFAULT_FLUSH_EVERY_BYTES = 64 * 1024 * 1024
# Read unit for finalize hashing, verify and stream(): large enough for hashlib and
# pread to run at memory speed, small enough not to matter for memory.
_IO_CHUNK = 4 * 1024 * 1024
_STATE_VERSION = 1


def _strerror(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    return f"{os.strerror(exc.errno) if exc.errno is not None else exc} ({code})"


@contextlib.contextmanager
def _disk(action: str, path: Path) -> Iterator[None]:
    """Turn OSError into StorageError naming the file and the errno text."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {path}: {_strerror(exc)}") from exc


class _Assembly:
    """One piece being assembled from blocks: its bytes and the ranges received."""

    __slots__ = ("buf", "ranges")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        # Disjoint, sorted, non-adjacent [start, end) ranges received so far.
        self.ranges: list[list[int]] = []

    def add(self, begin: int, data: memoryview) -> bool:
        """Copy a block in; True when the whole piece is covered."""
        end = begin + len(data)
        self.buf[begin:end] = data
        ranges = self.ranges
        if len(ranges) == 1 and ranges[0][0] == 0 and ranges[0][1] >= begin:
            # Blocks of a piece mostly arrive in order: extend the single leading range.
            first = ranges[0]
            first[1] = max(first[1], end)
            return first[1] == len(self.buf)
        i = bisect.bisect_left(ranges, [begin, -1])
        # Merge with a predecessor that touches or overlaps.
        if i > 0 and ranges[i - 1][1] >= begin:
            i -= 1
            begin = ranges[i][0]
        j = i
        while j < len(ranges) and ranges[j][0] <= end:
            end = max(end, ranges[j][1])
            j += 1
        ranges[i:j] = [[begin, end]]
        return len(ranges) == 1 and ranges[0][0] == 0 and ranges[0][1] == len(self.buf)


class BlobCursor:
    """Reads ``[start, end)`` of one store in order, bound to the store's generation:
    once finalize has found the blob bad and reset the store, every call raises
    :class:`DigestMismatchError`, so a reader never mixes bytes of two downloads.

    The caller drives it (``while not done: [policy while missing]; await wait(); read``)
    and learns what it needs from return values: :attr:`position`, :meth:`missing`.
    """

    def __init__(self, storage: PieceStorage, start: int, end: int | None) -> None:
        length = storage.metainfo.length
        end = length if end is None else end
        if not 0 <= start <= end <= length:
            raise LocalProtocolError(f"bad range {start}..{end} of {length} bytes")
        self._storage = storage
        self._generation = storage._generation
        self.position = start
        self.end = end

    @property
    def done(self) -> bool:
        return self.position >= self.end

    def _check_generation(self) -> None:
        if self._storage._generation != self._generation:
            raise DigestMismatchError("blob failed its digest check while streaming")

    def missing(self) -> bool:
        """The piece under :attr:`position` is not verified yet."""
        return not self._storage.has_piece(self.position // self._storage.metainfo.piece_length)

    async def wait(self) -> None:
        """Return once the piece under :attr:`position` is verified (a checkpoint even if
        it already is). Raises :class:`StorageError` if the store closes meanwhile."""
        await self._storage._wait(
            self.position // self._storage.metainfo.piece_length, self._generation
        )
        self._check_generation()

    def ready(self, max_bytes: int) -> int:
        """How many bytes from :attr:`position` (at most ``max_bytes``, up to :attr:`end`)
        :meth:`read` would return now: the run of verified pieces there (0 if the piece
        under the position is missing)."""
        self._check_generation()
        return self._storage.verified_run(self.position, min(self.end - self.position, max_bytes))

    async def wait_at(self, offset: int) -> None:
        """Return once the piece under ``offset`` (in ``[position, end)``) is verified,
        as :meth:`wait` does for the piece under the position."""
        if not self.position <= offset < self.end:
            raise LocalProtocolError(f"offset {offset} outside {self.position}..{self.end}")
        await self._storage._wait(offset // self._storage.metainfo.piece_length, self._generation)
        self._check_generation()

    def read(self, max_bytes: int) -> bytes:
        """The next verified bytes from :attr:`position` (at most ``max_bytes``, up to
        :attr:`end`), advancing past them. The piece under the position must be verified
        (:meth:`wait`)."""
        self._check_generation()
        data = self._storage.read_verified(self.position, min(self.end - self.position, max_bytes))
        self._check_generation()
        self.position += len(data)
        return data


class PieceStorage:
    """The pieces of one blob on disk. Create with :meth:`open` or :meth:`open_complete`."""

    def __init__(
        self,
        metainfo: Metainfo,
        fd: int,
        *,
        partial_path: Path | None,
        state_path: Path | None,
        final_path: Path,
        complete: bool,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        flush_every_bytes: int = DEFAULT_FLUSH_EVERY_BYTES,
    ) -> None:
        """Internal: use :meth:`open` or :meth:`open_complete`."""
        self.metainfo = metainfo
        self._fd: int | None = fd
        self._partial_path = partial_path
        self._state_path = state_path
        self._final_path = final_path
        self._complete = complete
        n = metainfo.num_pieces
        self._have = bytearray((n + 7) // 8)
        self._num_have = 0
        self._bytes_have = 0
        self._assembling: dict[int, _Assembly] = {}
        #: Pieces assembled in memory at once; a block starting another piece beyond this
        #: raises StorageBusyError (the caller's picker keeps fewer pieces in flight).
        self.max_pieces_in_progress = max(1, max_buffered_bytes // metainfo.piece_length)
        self._flush_every_bytes = flush_every_bytes
        self._unflushed_bytes = 0
        self._dirty = False
        # Bumped when verified pieces are forgotten (digest mismatch at finalize), so a
        # reader that already yielded bytes of the old generation fails instead of mixing.
        self._generation = 0
        self._changed = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._finalize_lock: trio.Lock | None = None
        if complete:
            self._mark_all()

    # ---- construction --------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        metainfo: Metainfo,
        *,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        flush_every_bytes: int = DEFAULT_FLUSH_EVERY_BYTES,
    ) -> PieceStorage:
        """Open (creating or resuming) the store for ``metainfo`` under ``root``.

        A final blob already present makes a complete store. Otherwise verified pieces
        recorded in the state file are re-hashed and kept if they still verify, the state
        belongs to this info-hash and the partial file has the right size; any other
        state (missing, corrupt, foreign) is discarded and the download starts clean.
        Resuming reads the recorded pieces back (~1 s per GiB): from trio, call this
        through ``trio.to_thread.run_sync``.
        """
        root_path = Path(root)
        files = BlobFiles(root_path, metainfo.digest_hex)
        final, partial, state = files.blob, files.partial, files.state

        def make(fd: int, complete: bool) -> PieceStorage:
            return cls(
                metainfo,
                fd,
                partial_path=partial,
                state_path=state,
                final_path=final,
                complete=complete,
                max_buffered_bytes=max_buffered_bytes,
                flush_every_bytes=flush_every_bytes,
            )

        with _disk("create directory", root_path):
            root_path.mkdir(parents=True, exist_ok=True)
        with _disk("open", final):
            try:
                fd = os.open(final, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                fd = -1
        if fd >= 0:
            try:
                with _disk("stat", final):
                    size = os.fstat(fd).st_size
                if size == metainfo.length:
                    # Leftovers of a run that crashed between the rename and the cleanup.
                    with _disk("remove", state):
                        state.unlink(missing_ok=True)
                        partial.unlink(missing_ok=True)
                    return make(fd, True)
            except BaseException:
                os.close(fd)
                raise
            # We rename only after a digest check, so a final file of the wrong size was
            # put there by someone else: remove it and download again.
            os.close(fd)
            with _disk("remove", final):
                final.unlink()
        with _disk("open", partial):
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with _disk("resize", partial):
                size_ok = os.fstat(fd).st_size == metainfo.length
                if not size_ok:
                    os.ftruncate(fd, metainfo.length)
        except BaseException:
            os.close(fd)
            raise
        store = make(fd, False)
        try:
            if size_ok:
                store._load_state()
            else:
                store._remove_state()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_complete(
        cls, path: str | os.PathLike[str], metainfo: Metainfo, verify: bool = False
    ) -> PieceStorage:
        """Seed an existing complete file (read-only; it is never moved or deleted).

        Raises :class:`StorageError` if the file cannot be opened or has the wrong size.
        With ``verify``, hashes it first: :class:`PieceHashError` for the first bad piece,
        :class:`DigestMismatchError` if the whole SHA-256 differs.
        """
        p = Path(path)
        with _disk("open", p):
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        store = cls(metainfo, fd, partial_path=None, state_path=None, final_path=p, complete=True)
        try:
            with _disk("stat", p):
                size = os.fstat(fd).st_size
            if size != metainfo.length:
                raise StorageError(f"{p} is {size} bytes, the torrent says {metainfo.length}")
            if verify:
                store._verify_all()
        except BaseException:
            store.close()
            raise
        return store

    def _verify_all(self) -> None:
        whole = hashlib.sha256()
        for index in range(self.metainfo.num_pieces):
            piece = self._pread(self.metainfo.piece_offset(index), self.metainfo.piece_size(index))
            if hashlib.sha1(piece).digest() != self.metainfo.pieces[index]:
                raise PieceHashError(index)
            whole.update(piece)
        if whole.digest() != self.metainfo.sha256_bytes:
            raise DigestMismatchError(f"{self._final_path} does not match {self.metainfo.sha256}")

    # ---- bitfield ------------------------------------------------------------------

    def has_piece(self, index: int) -> bool:
        self._check_index(index)
        return bool(self._have[index >> 3] & (0x80 >> (index & 7)))

    @property
    def have(self) -> bytes:
        """Verified pieces as a BitTorrent bitfield (piece 0 is the high bit of byte 0)."""
        return bytes(self._have)

    @property
    def num_have(self) -> int:
        return self._num_have

    @property
    def bytes_have(self) -> int:
        """Bytes in verified pieces (the tracker's ``length - left``)."""
        return self._bytes_have

    @property
    def all_pieces_verified(self) -> bool:
        """Every piece verified: time to :meth:`finalize` (if not :attr:`complete` yet)."""
        return self._num_have == self.metainfo.num_pieces

    @property
    def complete(self) -> bool:
        """The blob is final: verified whole against its digest and at :attr:`path`."""
        return self._complete

    @property
    def path(self) -> Path:
        """The final blob's path. Raises :class:`LocalProtocolError` before completion."""
        if not self._complete:
            raise LocalProtocolError("blob is not complete")
        return self._final_path

    @property
    def in_progress(self) -> frozenset[int]:
        """Pieces being assembled in memory."""
        return frozenset(self._assembling)

    def missing_pieces(self) -> list[int]:
        return [i for i in range(self.metainfo.num_pieces) if not self.has_piece(i)]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.metainfo.num_pieces:
            raise LocalProtocolError(
                f"piece index {index} out of range 0..{self.metainfo.num_pieces}"
            )

    def _mark(self, index: int) -> None:
        mask = 0x80 >> (index & 7)
        if not self._have[index >> 3] & mask:
            self._have[index >> 3] |= mask
            self._num_have += 1
            self._bytes_have += self.metainfo.piece_size(index)

    def _mark_all(self) -> None:
        for i in range(self.metainfo.num_pieces):
            self._mark(i)

    # ---- writing -------------------------------------------------------------------

    def write_block(self, index: int, begin: int, data: bytes | bytearray | memoryview) -> bool:
        """Store a block of piece ``index`` at offset ``begin`` within the piece.

        Returns True when this block completed the piece and it verified (it is then on
        disk and readable). Blocks for a piece already verified are ignored (False). A
        whole piece (``begin`` 0, the piece's size) is verified and stored at once, without
        an assembly buffer. Raises :class:`PieceHashError` if the completed piece is bad
        (its buffer is dropped; nothing is written), :class:`StorageBusyError` for a block
        that would start a piece beyond ``max_pieces_in_progress`` (back-pressure),
        :class:`LocalProtocolError` for a block outside the piece, :class:`StorageError`
        on disk errors.
        """
        self._check_open()
        self._check_index(index)
        view = memoryview(data).cast("B")
        size = self.metainfo.piece_size(index)
        if begin < 0 or len(view) == 0 or begin + len(view) > size:
            raise LocalProtocolError(
                f"block {begin}+{len(view)} outside piece {index} of {size} bytes"
            )
        if self.has_piece(index):
            return False
        if begin == 0 and len(view) == size:
            # A whole piece in one block (large blocks between p2pimage peers): hash and
            # write it where it lies, no assembly buffer, no copy; drop any partial one.
            self._assembling.pop(index, None)
            self._store_verified(index, view)
            return True
        assembly = self._assembling.get(index)
        if assembly is None:
            if len(self._assembling) >= self.max_pieces_in_progress:
                raise StorageBusyError(
                    f"{len(self._assembling)} pieces already in progress "
                    f"(max_pieces_in_progress={self.max_pieces_in_progress})"
                )
            assembly = self._assembling[index] = _Assembly(size)
        if not assembly.add(begin, view):
            return False
        del self._assembling[index]
        self._store_verified(index, assembly.buf)
        return True

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`write_block` for a whole piece; raises :class:`LocalProtocolError` if
        ``data`` is not exactly the piece's size."""
        self._check_index(index)
        view = memoryview(data).cast("B")
        if len(view) != self.metainfo.piece_size(index):
            raise LocalProtocolError(
                f"piece {index} is {self.metainfo.piece_size(index)} bytes, got {len(view)}"
            )
        return self.write_block(index, 0, view)

    def discard_piece(self, index: int) -> None:
        """Drop a piece's partial blocks (its peer went away); no-op if none."""
        self._assembling.pop(index, None)

    def _store_verified(self, index: int, data: bytes | bytearray | memoryview) -> None:
        if hashlib.sha1(data).digest() != self.metainfo.pieces[index]:
            raise PieceHashError(index)
        self._pwrite(self.metainfo.piece_offset(index), memoryview(data))
        self._mark(index)
        self._dirty = True
        self._unflushed_bytes += len(data)
        self._notify()
        if self._unflushed_bytes >= self._flush_every_bytes:
            self.flush()

    def _pwrite(self, offset: int, view: memoryview) -> None:
        assert self._fd is not None and self._partial_path is not None
        with _disk("write", self._partial_path):
            while view:
                written = os.pwrite(self._fd, view, offset)
                if written <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
                offset += written

    # ---- state file ----------------------------------------------------------------

    def flush(self) -> None:
        """Persist the verified-piece record now (atomically; see the module docstring)."""
        if not self._dirty or self._complete or self._fd is None:
            return
        assert self._state_path is not None
        record = bencode(
            {
                b"have": bytes(self._have),
                b"info_hash": self.metainfo.info_hash,
                b"version": _STATE_VERSION,
            }
        )
        tmp = self._state_path.with_name(self._state_path.name + ".tmp")
        with _disk("write", tmp):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        with _disk("replace", self._state_path):
            os.replace(tmp, self._state_path)
        self._dirty = False
        self._unflushed_bytes = 0

    def _load_state(self) -> None:
        assert self._state_path is not None
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot read {self._state_path}: {_strerror(exc)}") from exc
        try:
            record = bdecode(raw, max_size=64 + 2 * len(self._have) + 100)
        except BencodeError:
            record = None
        if (
            isinstance(record, dict)
            and record.get(b"version") == _STATE_VERSION
            and record.get(b"info_hash") == self.metainfo.info_hash
            and isinstance(have := record.get(b"have"), bytes)
            and len(have) == len(self._have)
            and self._spare_bits_clear(have)
        ):
            for i in range(self.metainfo.num_pieces):
                if have[i >> 3] & (0x80 >> (i & 7)):
                    offset = self.metainfo.piece_offset(i)
                    data = self._pread(offset, self.metainfo.piece_size(i))
                    if hashlib.sha1(data).digest() == self.metainfo.pieces[i]:
                        self._mark(i)
        else:
            self._remove_state()

    def _spare_bits_clear(self, have: bytes) -> bool:
        spare = len(have) * 8 - self.metainfo.num_pieces
        return spare == 0 or have[-1] & ((1 << spare) - 1) == 0

    def _remove_state(self) -> None:
        if self._state_path is None:
            return
        with _disk("remove", self._state_path):
            self._state_path.unlink(missing_ok=True)

    # ---- reading -------------------------------------------------------------------

    def read_block(self, index: int, begin: int, length: int) -> bytes:
        """Bytes of a verified piece. Raises :class:`LocalProtocolError` otherwise."""
        return self._pread(self.block_offset(index, begin, length), length)

    def block_offset(self, index: int, begin: int, length: int) -> int:
        """The blob offset of a block of a verified piece (what :meth:`read_block` would
        read). Raises :class:`LocalProtocolError` for a block outside the piece or a piece
        not verified, :class:`StorageError` if the store is closed."""
        self._check_open()
        self._check_index(index)
        size = self.metainfo.piece_size(index)
        if begin < 0 or length <= 0 or begin + length > size:
            raise LocalProtocolError(f"block {begin}+{length} outside piece {index} of {size}")
        if not self.has_piece(index):
            raise LocalProtocolError(f"piece {index} is not verified")
        return self.metainfo.piece_offset(index) + begin

    def sendfile(self, out_fd: int, offset: int, count: int) -> int:
        """Zero-copy write of up to ``count`` bytes of the complete blob, from ``offset``,
        to the (non-blocking) socket ``out_fd`` with :func:`os.sendfile`; returns the bytes
        the kernel took. Only a :attr:`complete` store serves this way: its bytes are
        verified as a whole and never reset (a partial file can be truncated by a failed
        digest check while the bytes are still queued). Raises :class:`StorageError` if the
        store is closed or not complete, :class:`LocalProtocolError` for a range outside
        the blob; a full socket raises :class:`BlockingIOError` (wait until it is writable
        and call again), a broken one :class:`OSError`."""
        fd = self._check_open()
        if not self._complete:
            raise StorageError(f"store for {self.metainfo.sha256} is not complete")
        if offset < 0 or count <= 0 or offset + count > self.metainfo.length:
            raise LocalProtocolError(f"bad range {offset}+{count} of {self.metainfo.length}")
        sent = os.sendfile(out_fd, fd, offset, count)
        if sent == 0:
            # sendfile returns 0 only at the input file's end: someone shortened the blob.
            raise StorageError(f"{self._final_path} is shorter than its torrent")
        return sent

    def read_verified(self, offset: int, max_bytes: int) -> bytes:
        """Bytes from ``offset`` over the run of verified pieces that starts there, at
        most ``max_bytes``, in one read. The piece under ``offset`` must be verified
        (else :class:`LocalProtocolError`)."""
        length = self.metainfo.length
        if not 0 <= offset < length or max_bytes <= 0:
            raise LocalProtocolError(f"bad read at {offset} of {length} bytes")
        piece_length = self.metainfo.piece_length
        if not self.has_piece(offset // piece_length):
            raise LocalProtocolError(f"piece {offset // piece_length} is not verified")
        return self._pread(offset, self.verified_run(offset, max_bytes))

    def verified_run(self, offset: int, max_bytes: int) -> int:
        """The length of the run of verified bytes from ``offset``: at most ``max_bytes``,
        up to the blob's end, 0 when the piece under ``offset`` is not verified."""
        length = self.metainfo.length
        if not 0 <= offset < length or max_bytes <= 0:
            return 0
        piece_length = self.metainfo.piece_length
        limit = offset - offset % piece_length
        stop = min(length, offset + max_bytes)
        while limit < stop and self.has_piece(limit // piece_length):
            limit += piece_length
        return max(0, min(stop, limit) - offset)

    def _pread(self, offset: int, length: int) -> bytes:
        fd = self._check_open()
        path = self._final_path if self._complete else self._partial_path
        assert path is not None
        with _disk("read", path):
            data = os.pread(fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    raise OSError(errno.EIO, "file shorter than expected")
                parts.append(more)
                got += len(more)
            return b"".join(parts)

    async def wait_piece(self, index: int) -> None:
        """Return once piece ``index`` is verified (a checkpoint even if it already is).

        Raises :class:`StorageError` if the store is closed while waiting.
        """
        await self._wait(index, None)

    async def _wait(self, index: int, generation: int | None) -> None:
        self._check_index(index)
        await trio.lowlevel.checkpoint()
        self._trio_token = trio.lowlevel.current_trio_token()
        while True:
            # Take the event before testing: a writer in another thread marks the piece
            # and then swaps the event, so either the test sees the piece or the event
            # taken here is the one that gets set.
            changed = self._changed
            if self.has_piece(index):
                return
            self._check_open()
            if generation is not None and generation != self._generation:
                raise DigestMismatchError("blob failed its digest check while streaming")
            await changed.wait()

    def cursor(self, start: int = 0, end: int | None = None) -> BlobCursor:
        """An in-order reader of ``[start, end)`` for a caller that runs its own policy
        while a piece is missing (the swarm's); :meth:`stream` is the plain loop over it."""
        return BlobCursor(self, start, end)

    async def stream(
        self, start: int = 0, end: int | None = None, chunk_size: int = 1024 * 1024
    ) -> AsyncGenerator[bytes, None]:
        """Yield the blob's bytes ``[start, end)`` in order, each as soon as it verifies.

        Chunks are at most ``chunk_size`` bytes. Any number of readers may stream at
        once. Raises :class:`DigestMismatchError` if, mid-stream, finalize found the
        whole blob bad and reset the store.
        """
        cursor = self.cursor(start, end)
        if chunk_size <= 0:
            raise LocalProtocolError(f"bad chunk size {chunk_size}")
        while not cursor.done:
            await cursor.wait()
            yield cursor.read(chunk_size)

    def _notify(self) -> None:
        """Wake every waiter; safe from the trio thread and from worker threads."""
        event, self._changed = self._changed, trio.Event()
        token = self._trio_token
        if token is None or trio.lowlevel.in_trio_run():
            event.set()
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(event.set)

    # ---- completion ----------------------------------------------------------------

    def finalize_sync(self) -> Path:
        """Check the whole blob and move it into place; returns the final path.

        Blocks for the time it takes to read and hash the blob (~0.6 s per GiB): call it
        from a thread, or use :meth:`finalize`. Idempotent once complete. Raises
        :class:`LocalProtocolError` if pieces are missing; :class:`DigestMismatchError`
        if the SHA-256 differs (every piece is then forgotten, the partial file zeroed
        and the state removed); :class:`StorageError` on disk errors.
        """
        if self._complete:
            return self._final_path
        fd = self._check_open()
        if not self.all_pieces_verified:
            raise LocalProtocolError(
                f"{self.metainfo.num_pieces - self._num_have} pieces still missing"
            )
        assert self._partial_path is not None
        whole = hashlib.sha256()
        length = self.metainfo.length
        for offset in range(0, length, _IO_CHUNK):
            whole.update(self._pread(offset, min(_IO_CHUNK, length - offset)))
        if whole.digest() != self.metainfo.sha256_bytes:
            self._reset()
            raise DigestMismatchError(
                f"blob sha256:{whole.hexdigest()} does not match {self.metainfo.sha256}"
            )
        with _disk("fsync", self._partial_path):
            os.fsync(fd)
        with _disk("rename to final", self._partial_path):
            os.replace(self._partial_path, self._final_path)
        self._complete = True
        self._dirty = False
        with contextlib.suppress(OSError):  # durability of the rename; best effort
            dir_fd = os.open(self._final_path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._remove_state()
        self._notify()
        return self._final_path

    async def finalize(self) -> Path:
        """:meth:`finalize_sync` in a worker thread; concurrent callers wait for one run."""
        if self._finalize_lock is None:
            self._finalize_lock = trio.Lock()
        self._trio_token = trio.lowlevel.current_trio_token()
        async with self._finalize_lock:
            return await trio.to_thread.run_sync(self.finalize_sync)

    def _reset(self) -> None:
        assert self._fd is not None and self._partial_path is not None
        self._have = bytearray(len(self._have))
        self._num_have = 0
        self._bytes_have = 0
        self._assembling.clear()
        self._generation += 1
        self._dirty = False
        self._unflushed_bytes = 0
        self._remove_state()
        with _disk("reset", self._partial_path):
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.metainfo.length)
        self._notify()

    # ---- lifetime ------------------------------------------------------------------

    def _check_open(self) -> int:
        if self._fd is None:
            raise StorageError(f"store for {self.metainfo.sha256} is closed")
        return self._fd

    def close(self) -> None:
        """Flush the state, close the file and wake waiting readers (they get
        :class:`StorageError`). Idempotent."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None
            self._assembling.clear()
            self._notify()

    def __enter__(self) -> PieceStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
