"""The trio layer around :class:`~p2pimage.wire.PeerConnection`: one TCP peer session.

Short and boring on purpose. A :class:`PeerSession` owns a stream and a protocol object;
:meth:`PeerSession.handshake` runs the (authenticated) handshake; afterwards
:meth:`PeerSession.receive` returns messages and :meth:`PeerSession.send` queues them.
Queued messages are written by one writer task in batches (one ``send_all`` per batch,
not per 16 KiB block: measured on loopback, batching is worth 2-3x), with piece bytes
paced by the upload limiter. On an encrypted connection each batch is sealed as a whole
(``PeerConnection.seal_into``), so encryption costs one AEAD call per batch, not per
block, into a send buffer the session keeps (reused once the previous send returned).
On a connection in the clear over a TCP socket, blocks of a complete blob can be queued
as file regions (:meth:`PeerSession.send_piece_from_file`): the writer sends their bytes
with ``os.sendfile``, from the page cache to the socket without a copy in Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pimage.auth.tokens import NodeToken, PeerAuthenticator
from p2pimage.errors import (
    AuthError,
    LocalProtocolError,
    PeerClosed,
    ProtocolVersionError,
    RemoteProtocolError,
    StorageError,
)
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.wire import (
    HAVES_EXTENSION,
    LOCAL_HAVES_ID,
    MAX_BLOCK_LENGTH_LIMIT,
    NEED_DATA,
    Cancel,
    ConnectionClosed,
    Extended,
    ExtendedHandshake,
    HandshakeReceived,
    Have,
    Interested,
    Message,
    NotInterested,
    PeerAuthenticated,
    PeerConnection,
    Piece,
    Request,
    Role,
    Unchoke,
    build_haves_payload,
    piece_header,
    sealed_length,
)

__all__ = ["PeerSession", "SessionInfo", "PeerClosed"]

log = logging.getLogger("p2pimage.swarm.session")

# Bytes asked of the socket per receive: enough for several 16 KiB blocks per wakeup.
RECEIVE_SIZE = 256 * 1024
# Flush a write batch once it holds this much; larger batches add latency, smaller ones
# cost a system call per block (one send_all per block halves loopback throughput).
WRITE_BATCH_BYTES = 512 * 1024
# A batch may pass WRITE_BATCH_BYTES by this much, so that two 256 KiB blocks with their
# headers (or 32 blocks of 16 KiB) still make one batch; a chunk that would go beyond it
# waits for the next batch. Batches then fit the session's send buffer.
WRITE_BATCH_SLACK = 4 * 1024
WRITE_BATCH_LIMIT = WRITE_BATCH_BYTES + WRITE_BATCH_SLACK
# The session's reusable send buffer: the records of the largest batch. Allocated at the
# first batch of at least SEND_BUFFER_MIN bytes (a session that only asks for pieces never
# holds one) and kept for the session's life: ~516 KiB per uploading session, where each
# batch used to allocate a joined and a sealed buffer of its size (a ~1 MiB transient).
SEND_BUFFER_BYTES = sealed_length(WRITE_BATCH_BYTES + WRITE_BATCH_SLACK)
SEND_BUFFER_MIN = 64 * 1024
# The smallest block worth sending by sendfile: each file region costs a send_all for
# the bytes before it and at least one sendfile, where a batch of blocks read into
# memory costs one send_all. Measured with benchmarks.wire_path (a session's writer,
# loopback, CPU ms per MiB, by sendfile against read and batched): 16 KiB blocks 1.79
# against 1.00, 32 KiB 0.92 / 0.75, 64 KiB 0.58 / 0.63, 128 KiB 0.38 / 0.53, 256 KiB
# 0.28 / 0.53 (docs/benchmarks.md, "CPU per delivered MiB").
SENDFILE_MIN_BLOCK = 64 * 1024
# A socket read no larger than this holds control messages, not piece data (a request
# is 17 bytes, 45 encrypted; the smallest block is 16 KiB): it goes first on the node's
# download limiter (RateLimiter.acquire(first=True)), never behind an origin read.
CONTROL_READ_MAX = 4 * 1024
# A p2pimage_haves message within the 64 KiB extended-message limit (4 bytes a piece).
MAX_HAVES_PER_MESSAGE = 8192


class FileSource(Protocol):
    """Where a file region's bytes come from (:meth:`PieceStorage.sendfile`)."""

    def sendfile(self, out_fd: int, offset: int, count: int) -> int: ...


@dataclass(slots=True)
class _FileRegion:
    """``length`` bytes of ``source`` from ``offset``, queued to go out by sendfile."""

    source: FileSource
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


_Chunk = bytes | bytearray | memoryview | _FileRegion


@dataclass(slots=True)
class _PieceOut:
    """A piece message in the outbox: its header and its block, written in one batch (a
    control message may go out between two pieces, never between a header and its block)."""

    header: bytes
    body: bytes | bytearray | memoryview | _FileRegion

    def __len__(self) -> int:
        return len(self.header) + len(self.body)


_Queued = bytes | bytearray | memoryview | _PieceOut

# Messages that go out ahead of the piece data queued on a connection, at the head of the
# next batch: a request, a cancel or a have waiting behind up to a MiB of blocks reached
# the uploader ~1 s late at scale, and a node's pipeline of 1 s could not keep the
# uploaders busy (docs/benchmarks.md, "Requests ahead, the neediest first"). Their order
# among themselves is kept; a choke or a bitfield keeps its place in line.
_CONTROL_TYPES = (Request, Cancel, Have, Interested, NotInterested, Unchoke)


@dataclass
class SessionInfo:
    """What the handshake established about the peer."""

    peer_id: bytes
    info_hash: bytes
    token: NodeToken | None = None
    extended: ExtendedHandshake | None = None
    messages: list[Message] = field(default_factory=list)  # arrived with the handshake
    # Whether the tokens that admitted this connection have expired: set by the node
    # after the handshake; the swarm closes the connection once it says so.
    admission_expired: Callable[[], bool] = field(default=lambda: False)


class PeerSession:
    """A peer connection driven over a trio stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: PeerConnection,
        *,
        address: tuple[str, int],
        upload: RateLimiter | None = None,
        download: RateLimiter | None = None,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.address = address
        self._upload = upload or RateLimiter(None)
        self._download = download or RateLimiter(None)
        self._outbox: deque[_Queued] = deque()
        self._outbox_bytes = 0
        self._outbox_pieces = 0  # _PieceOut items in the outbox
        self._control: deque[bytes] = deque()  # control messages, ahead of the pieces
        self._writing = 0  # bytes of the batch being written
        # When the writer last showed progress: a batch written, or bytes queued while
        # nothing was unsent (PeerSession.unsent_bytes_moving).
        self._progress_at = 0.0
        # Parked on by the owner of several sessions (the swarm's uploader), woken after
        # each batch written: PeerSession.set_sent_lot.
        self._sent_lot: trio.lowlevel.ParkingLot | None = None
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._closed: str | None = None
        self._haves: list[int] = []  # for one p2pimage_haves message in the next batch
        # The haves must go out now (not only with the next batch): send_have without
        # defer, or flush_haves.
        self._haves_due = False
        self._can_send_file: bool | None = None
        self._receive_buffer: bytearray | None = None
        # The last socket read came back short of the buffer: the socket was empty then,
        # so the next read waits for it to be readable first (_recv_into's wait_first)
        # instead of trying a read that fails with EAGAIN.
        self._read_drained = False
        self._send_buffer: bytearray | None = None
        self._send_buffer_busy = False  # its bytes are in send_all: not to be overwritten
        if isinstance(stream, trio.SocketStream):
            # Socket reads land here (recv_into), not in a new bytes object per read: the
            # RECEIVE_SIZE each read allocated before is now held for the session's life.
            self._receive_buffer = bytearray(RECEIVE_SIZE)
            self._receive_view = memoryview(self._receive_buffer)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.payload_sent = 0

    # --- handshake ----------------------------------------------------------------------

    async def handshake(
        self,
        *,
        accept: Callable[[bytes], bool] | None = None,
        unwanted: Callable[[bytes], bool] | None = None,
    ) -> SessionInfo:
        """Run the handshake until the connection is open (and, unless open mode, the peer
        is authenticated). ``accept`` decides, for a responder, whether the info-hash the
        peer asked for is one we serve; ``unwanted``, for an initiator, ends the
        handshake (:class:`PeerClosed`) when true of the peer id in the peer's 68-byte
        handshake, before anything costly. Callers bound the time with a cancel scope.
        """
        await self._flush_protocol_output()
        info: SessionInfo | None = None
        extended: ExtendedHandshake | None = None
        token: NodeToken | None = None
        early: list[Message] = []
        while True:
            try:
                event = self.conn.next_event()
            except AuthError as exc:
                # Tell the peer nothing beyond closing; log the reason on our side.
                raise PeerClosed(f"authentication failed: {exc}") from None
            except ProtocolVersionError as exc:
                # A rolling upgrade: operators must see it (the pull falls back meanwhile).
                log.warning("peer %s:%d refused: %s", *self.address, exc)
                raise PeerClosed(f"protocol version: {exc}") from None
            except RemoteProtocolError as exc:
                raise PeerClosed(f"protocol error: {exc}") from None
            if event is NEED_DATA:
                if self.conn.is_open and info is not None:
                    info.extended, info.token = extended, token
                    info.messages = early
                    return info
                await self._receive_into_conn()
                continue
            if isinstance(event, HandshakeReceived):
                info = SessionInfo(peer_id=event.peer_id, info_hash=event.info_hash)
                if self.conn.our_role is Role.RESPONDER:
                    if accept is None or not accept(event.info_hash):
                        self.conn.reject()
                        raise PeerClosed("unknown info-hash")
                    self.conn.accept()
                elif unwanted is not None and unwanted(event.peer_id):
                    raise PeerClosed("already connected to this peer")
                await self._flush_protocol_output()
            elif isinstance(event, ExtendedHandshake):
                extended = event
                await self._flush_protocol_output()
            elif isinstance(event, PeerAuthenticated):
                token = event.token
                await self._flush_protocol_output()
            elif isinstance(event, ConnectionClosed):
                raise PeerClosed("closed during handshake")
            else:
                early.append(event)

    async def _flush_protocol_output(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerClosed(f"connection lost: {exc}") from None

    async def feed(self, data: bytes) -> None:
        """Bytes the caller already read off the stream (a listener that waited for the
        first bytes before building the session); kept for :meth:`handshake`."""
        await self._received(data)

    async def _receive_into_conn(self) -> None:
        try:
            if self._receive_buffer is not None:
                # One reusable buffer per session: no bytes object allocated per read.
                assert isinstance(self.stream, trio.SocketStream)
                buffer = self._receive_buffer
                n = await _recv_into(self.stream.socket, buffer, wait_first=self._read_drained)
                self._read_drained = n < len(buffer)
                data: bytes | bytearray | memoryview = self._receive_view[:n]
            else:
                data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerClosed(f"connection lost: {exc}") from None
        await self._received(data)

    async def _received(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            # A read this small carries control messages (requests, haves, interest): it
            # passes ahead of bulk reads like an origin read does, so a fetcher whose
            # downlink is full of registry reads still hears its peers' requests (behind
            # them, its uplink idled until its range was read: docs/benchmarks.md,
            # "Calibration").
            await self._download.acquire(len(data), first=len(data) <= CONTROL_READ_MAX)
            self.bytes_received += len(data)
        try:
            self.conn.receive_data(data)  # (copied in: the view may be reused after)
        except RemoteProtocolError as exc:
            raise PeerClosed(f"protocol error: {exc}") from None

    # --- after the handshake ------------------------------------------------------------

    async def receive_batch(self) -> list[Message]:
        """Every message parsed from the bytes at hand (at least one): one wakeup per
        socket read, not one per message (a node hears a ``have`` from every peer for
        every piece). Raises :class:`PeerClosed` at the end; messages parsed before an
        error or EOF are returned first."""
        batch: list[Message] = []
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                if batch:
                    return batch  # the next call raises (the connection stays failed)
                raise PeerClosed(f"protocol error: {exc}") from None
            if event is NEED_DATA:
                if batch:
                    return batch
                await self._receive_into_conn()
                continue
            if isinstance(event, ConnectionClosed):
                if batch:
                    return batch
                raise PeerClosed("peer closed the connection")
            if isinstance(event, HandshakeReceived | ExtendedHandshake | PeerAuthenticated):
                continue
            batch.append(event)

    async def receive(self) -> Message:
        """The next message from the peer; raises :class:`PeerClosed` at the end."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                raise PeerClosed(f"protocol error: {exc}") from None
            if event is NEED_DATA:
                await self._receive_into_conn()
                continue
            if isinstance(event, ConnectionClosed):
                raise PeerClosed("peer closed the connection")
            if isinstance(event, HandshakeReceived | ExtendedHandshake | PeerAuthenticated):
                continue
            return event

    def send(self, message: Message) -> None:
        """Queue ``message``; the writer task sends it. Never blocks."""
        if self._not_sending():
            return
        if not self._outbox_bytes and not self._writing:
            self._progress_at = trio.current_time()
        if isinstance(message, Piece):
            pending = self.conn.data_to_send()
            if pending:
                self._outbox.append(pending)
                self._outbox_bytes += len(pending)
            header = piece_header(message.index, message.begin, len(message.data))
            self._outbox.append(_PieceOut(header, message.data))
            self._outbox_pieces += 1
            self._outbox_bytes += 13 + len(message.data)
            self.payload_sent += len(message.data)
        elif isinstance(message, _CONTROL_TYPES):
            self._queue_control(self.conn.send(message))
        else:
            data = self.conn.send(message)
            self._outbox.append(data)
            self._outbox_bytes += len(data)
        self._wakeup.set()

    def _queue_control(self, data: bytes) -> None:
        """A control message goes ahead of the piece data queued (behind the control
        messages before it); with no piece data queued, in line."""
        if self._control or self._outbox_pieces:
            self._control.append(data)
        else:
            self._outbox.append(data)
            self._outbox_bytes += len(data)

    def _not_sending(self) -> bool:
        """True when nothing more goes out: the session closed, or the protocol closed
        the connection (an error on the read side; the session is being torn down and
        whatever we meant to say no longer matters)."""
        if self._closed is not None:
            return True
        if not self.conn.is_open:
            self._closed = "connection closed"
            self._wakeup.set()
            self._drained.set()
            return True
        return False

    @property
    def can_send_file(self) -> bool:
        """Whether :meth:`send_piece_from_file` may be used: piece traffic in the clear
        over a TCP socket (sendfile needs the socket's descriptor and unsealed bytes).
        It pays for blocks of at least :data:`SENDFILE_MIN_BLOCK`."""
        if self._can_send_file is None:
            if not self.conn.is_open:
                return False
            # Fixed once the connection is open: decided once, asked once per block.
            self._can_send_file = (
                not self.conn.encrypted
                and isinstance(self.stream, trio.SocketStream)
                and hasattr(os, "sendfile")
            )
        return self._can_send_file

    def send_piece_from_file(
        self, index: int, begin: int, source: FileSource, offset: int, length: int
    ) -> None:
        """Queue a piece message whose ``length`` block bytes the writer sends straight
        from ``source`` at ``offset`` (zero copy); only where :attr:`can_send_file`."""
        if self._not_sending():
            return
        if not self.can_send_file:
            raise LocalProtocolError("send_piece_from_file needs a plaintext TCP connection")
        if not self._outbox_bytes and not self._writing:
            self._progress_at = trio.current_time()
        header = self.conn.piece_header(index, begin, length)  # with pending protocol output
        self._outbox.append(_PieceOut(header, _FileRegion(source, offset, length)))
        self._outbox_pieces += 1
        self._outbox_bytes += len(header) + length
        self.payload_sent += length
        self._wakeup.set()

    def send_have(self, index: int, *, defer: bool = False) -> None:
        """Tell the peer we have piece ``index``: gathered with the other haves of this
        writer batch into one ``p2pimage_haves`` message when the peer advertised it, a
        BEP 3 have otherwise. With ``defer`` (a peer that advertised it only), the have
        does not wake the writer: it leaves with whatever the writer sends next, or at
        the next :meth:`flush_haves`."""
        if self._closed is not None or not self.conn.is_open:
            self.send(Have(index))  # (closes the session as send() would)
            return
        if self.conn.peer_extension_id(HAVES_EXTENSION) is None:
            self.send(Have(index))
            return
        self._haves.append(index)
        if not defer:
            self._haves_due = True
            self._wakeup.set()

    @property
    def haves_waiting(self) -> bool:
        """Whether deferred haves wait for the next batch (or :meth:`flush_haves`)."""
        return bool(self._haves)

    def flush_haves(self) -> None:
        """Send the deferred haves now (wake the writer if any wait)."""
        if self._haves:
            self._haves_due = True
            self._wakeup.set()

    def _haves_message(self) -> bytes:
        ext_id = self.conn.peer_extension_id(HAVES_EXTENSION)
        assert ext_id is not None
        haves, self._haves = self._haves, []
        out = []
        step = MAX_HAVES_PER_MESSAGE
        for start in range(0, len(haves), step):
            payload = build_haves_payload(haves[start : start + step])
            out.append(self.conn.send(Extended(ext_id, payload)))
        return b"".join(out)

    @property
    def queued_bytes(self) -> int:
        return self._outbox_bytes

    @property
    def unsent_bytes(self) -> int:
        """Bytes queued or in the batch waiting for the upload limiter: what this session
        holds of its node's uplink."""
        return self._outbox_bytes + self._writing

    def unsent_bytes_moving(self, now: float, stuck_s: float) -> int:
        """:attr:`unsent_bytes`, or 0 while the writer has shown no progress for
        ``stuck_s`` (a peer that stopped reading: its bytes are not the link's to wait for)."""
        unsent = self._outbox_bytes + self._writing
        return unsent if unsent and now - self._progress_at < stuck_s else 0

    def _granted(self) -> None:
        """The upload limiter let the batch being written pass: its bytes are the link's
        now (a receiver that reads slowly holds them in TCP, not in the node's uplink)."""
        self._writing = 0
        self._progress_at = trio.current_time()
        if self._sent_lot is not None:
            self._sent_lot.unpark_all()

    def set_sent_lot(self, lot: trio.lowlevel.ParkingLot) -> None:
        """Wake ``lot`` each time a batch passes the upload limiter (and when the session
        closes): its owner waits there for room under a budget shared by several
        sessions."""
        self._sent_lot = lot

    async def wait_queue_below(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait to be written (back-pressure for
        uploaders); returns at once if the session has closed."""
        while self._outbox_bytes > limit and self._closed is None:
            self._drained = trio.Event()
            await self._drained.wait()

    async def run_writer(self) -> None:
        """Write queued messages in batches until the session closes."""
        # Whether the task has yielded to the scheduler since its last write: woken from
        # its wait, or held back by the limiter. Then a write that goes through at once
        # does not yield again (a control message woke the writer and cost it two task
        # steps: the wake and the yield after the write).
        yielded = False
        while True:
            if self._haves and self._closed is None and (self._haves_due or self._outbox):
                self._haves_due = False
                try:
                    self._queue_control(self._haves_message())
                except LocalProtocolError:
                    raise PeerClosed("connection closed") from None
            if not self._outbox and not self._control:
                if self._closed is not None:
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                yielded = True
                continue
            batch: list[_Chunk] = []
            size = 0
            regions = False
            if self._control and (not self._outbox or type(self._outbox[0]) is _PieceOut):
                # Between two piece messages: the control messages open this batch, ahead
                # of the pieces queued (one write for both, as when they queued in line).
                batch.append(b"".join(self._control))
                self._control.clear()
                size = len(batch[0])
            control_bytes = size
            while (
                self._outbox
                and size < WRITE_BATCH_BYTES
                and (not batch or size + len(self._outbox[0]) <= WRITE_BATCH_LIMIT)
            ):
                item = self._outbox.popleft()
                size += len(item)
                if type(item) is _PieceOut:
                    self._outbox_pieces -= 1
                    batch.append(item.header)
                    batch.append(item.body)
                    regions = regions or type(item.body) is _FileRegion
                else:
                    batch.append(item)  # type: ignore[arg-type]
            self._outbox_bytes -= size - control_bytes
            self._writing = size
            self._drained.set()
            try:
                if regions:
                    # (Only queued in the clear: nothing to seal.) One quantum of the
                    # limiter for the whole batch, as for a batch of bytes.
                    if not self.conn.is_open:
                        raise PeerClosed("connection closed")
                    await self._upload.acquire(size)
                    self._granted()
                    await self._write_with_regions(batch)
                    self.bytes_sent += size
                    continue
                await self._write_batch(batch, size, yielded)  # type: ignore[arg-type]
                yielded = False
            finally:
                if self._writing:  # (else _granted has done this already)
                    self._writing = 0
                    if self._sent_lot is not None:
                        self._sent_lot.unpark_all()
                self._progress_at = trio.current_time()

    async def _write_batch(
        self, batch: list[bytes | bytearray | memoryview], size: int, yielded: bool = False
    ) -> None:
        """Seal a batch (one AEAD pass on an encrypted connection; as is otherwise) and
        send it: into the session's send buffer when it fits and is free, so a batch
        allocates nothing, or else into a new buffer. ``yielded``: the writer has yielded
        since its last write (then a send that goes through at once does not yield)."""
        try:
            need = self.conn.sealed_length(size)
            buffer = self._send_buffer
            if buffer is None and SEND_BUFFER_MIN <= need <= SEND_BUFFER_BYTES:
                buffer = self._send_buffer = bytearray(SEND_BUFFER_BYTES)
            if (
                buffer is None
                or need < SEND_BUFFER_MIN
                or self._send_buffer_busy
                or need > len(buffer)
            ):
                # (A small batch, control messages mostly, is sealed in one AEAD call.)
                data: bytes | bytearray | memoryview = self.conn.seal(b"".join(batch))
                buffer = None
            else:
                # Never resized, so the views handed to send_all stay valid; reused only
                # once send_all has returned (the busy flag guards against a second writer).
                data = memoryview(buffer)[: self.conn.seal_into(buffer, batch)]
        except LocalProtocolError:
            raise PeerClosed("connection closed") from None
        sent = len(data)
        # A batch the limiter held back has yielded already: its write need not yield
        # again (one task step per batch, not two).
        yielded = await self._upload.acquire(sent) or yielded
        self._granted()
        if buffer is not None:
            self._send_buffer_busy = True
        try:
            if isinstance(self.stream, trio.SocketStream):
                await _send_all(self.stream.socket, data, yielded=yielded)
            else:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerClosed(f"connection lost: {exc}") from None
        finally:
            if buffer is not None:
                self._send_buffer_busy = False
                data.release()  # type: ignore[union-attr]
        self.bytes_sent += sent

    async def _write_with_regions(self, batch: list[_Chunk]) -> None:
        """Write a batch in order: runs of bytes with ``send_all``, file regions with
        ``sendfile`` whenever the socket can take more."""
        assert isinstance(self.stream, trio.SocketStream)
        sock = self.stream.socket
        pending: list[bytes | bytearray | memoryview] = []
        try:
            for chunk in batch:
                if type(chunk) is not _FileRegion:
                    pending.append(chunk)  # type: ignore[arg-type]
                    continue
                if pending:
                    await self.stream.send_all(b"".join(pending))
                    pending.clear()
                offset, left = chunk.offset, chunk.length
                while left:
                    try:
                        sent = chunk.source.sendfile(sock.fileno(), offset, left)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    offset += sent
                    left -= sent
            if pending:
                await self.stream.send_all(b"".join(pending))
        except StorageError as exc:
            # The piece header is out already: the only way on is to hang up.
            raise PeerClosed(f"cannot serve the block: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerClosed(f"connection lost: {exc}") from None

    async def aclose(self, reason: str = "closed") -> None:
        if self._closed is None:
            self._closed = reason
        self._wakeup.set()
        self._drained.set()
        if self._sent_lot is not None:
            self._sent_lot.unpark_all()
        with contextlib.suppress(LocalProtocolError):
            self.conn.close()
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


# Socket calls of the data path. trio's socket methods wrap each call in several layers
# (a generic helper, an async context manager, an error-translating context manager, a
# conflict detector): per call they cost more than a small send or receive itself, and
# a node makes tens of thousands (most of them haves and requests, a few bytes each).
# These two make the same calls with the same checkpoints: a cancellation check first;
# then, if the call went through at once, one yield (cancellation shielded), else a
# wait until the socket is ready (which is the yield). A caller that knows the socket
# was empty (its last read came back short) waits first: half of the session's reads
# used to be a readv failing with EAGAIN before the wait (strace, 16-node swarm: 7,900
# of 16,100 per worker process); a caller that has just yielded (its rate limiter
# slept) skips the yield after a send that went through at once. Errors come out as OSError (or
# trio.ClosedResourceError while waiting on a socket being closed). The descriptor is
# asked for at each call, never kept: a closed socket's is -1 (EBADF), not a reused one.


async def _recv_into(
    sock: trio.socket.SocketType, buffer: bytearray, *, wait_first: bool = False
) -> int:
    """``await sock.recv_into(buffer)``, at less cost; 0 at EOF. With ``wait_first``,
    wait until the socket is readable before the first read (one system call instead
    of two when no bytes are there yet)."""
    if not wait_first or sock.fileno() < 0:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            n = os.readv(sock.fileno(), (buffer,))
        except BlockingIOError:
            pass  # (nothing there yet: wait below)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return n
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.readv(sock.fileno(), (buffer,))
        except BlockingIOError:
            continue


async def _send_all(
    sock: trio.socket.SocketType,
    data: bytes | bytearray | memoryview,
    *,
    yielded: bool = False,
) -> None:
    """``await trio.SocketStream(sock).send_all(data)``, at less cost. ``yielded``: the
    caller has just yielded to the scheduler, so a send that goes through at once does
    not yield again (the cancellation check stays)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = yielded
    with memoryview(data) as view:
        total = len(view)
        sent = 0
        while sent < total:
            try:
                sent += os.write(sock.fileno(), view[sent:] if sent else view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                waited = True
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()


def new_peer_id(prefix: bytes = b"-PI0300-") -> bytes:
    """A 20-byte peer id in the Azureus style (client and version, then random bytes), for
    open mode; authenticated nodes use ``PeerAuthenticator.peer_id()`` (bound to the token)."""
    return prefix + os.urandom(20 - len(prefix))


def make_connection(
    role: Role,
    *,
    peer_id: bytes,
    info_hash: bytes | None,
    authenticator: PeerAuthenticator | None,
    max_block_length: int | None = None,
    encrypt: bool = True,
    listen_port: int | None = None,
) -> PeerConnection:
    """A :class:`PeerConnection` with a fresh nonce and key-exchange key (the auth
    messages always travel encrypted; with ``encrypt`` the piece traffic too, and the
    peer must agree); open mode when no authenticator. ``max_block_length`` (default
    :data:`MAX_BLOCK_LENGTH_LIMIT`) is the largest block we accept, offered in the
    extended handshake; stock clients ignore the offer and keep 16 KiB blocks.
    ``listen_port`` goes out as BEP 10's ``p``: the peer learns our listen address."""
    block = MAX_BLOCK_LENGTH_LIMIT if max_block_length is None else max_block_length
    extensions = {HAVES_EXTENSION: LOCAL_HAVES_ID}
    if authenticator is None:
        return PeerConnection(
            role=role,
            info_hash=info_hash,
            peer_id=peer_id,
            authenticator=None,
            open_mode=True,
            max_block_length=block,
            extensions=extensions,
            listen_port=listen_port,
        )
    return PeerConnection(
        role=role,
        info_hash=info_hash,
        peer_id=peer_id,
        authenticator=authenticator,
        nonce=os.urandom(32),
        kx_key=os.urandom(32),
        encrypt=encrypt,
        max_block_length=block,
        extensions=extensions,
        listen_port=listen_port,
    )
